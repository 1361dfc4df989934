# Cross compilation for 64-bit ARM Linux with the Debian/Ubuntu GNU cross toolchain
# (g++-aarch64-linux-gnu); test binaries run through qemu-aarch64 (see
# custom_ops/tests/run_neon_tests.sh).
#
#   cmake -S . -B build-aarch64 -G Ninja \
#     -DCMAKE_TOOLCHAIN_FILE=custom_ops/cmake/aarch64-toolchain.cmake \
#     -DQUANTX_BUILD_OPS=OFF -DQUANTX_BUILD_TESTS=ON
#
# QUANTX_AARCH64_PREFIX overrides the compiler prefix and QUANTX_AARCH64_SYSROOT the target
# root (default /usr/aarch64-linux-gnu, also given to qemu as -L).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(NOT DEFINED QUANTX_AARCH64_PREFIX)
  set(QUANTX_AARCH64_PREFIX aarch64-linux-gnu-)
endif()
if(NOT DEFINED QUANTX_AARCH64_SYSROOT)
  set(QUANTX_AARCH64_SYSROOT /usr/aarch64-linux-gnu)
endif()
# Try-compile projects get the toolchain file again: pass the choices on.
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES QUANTX_AARCH64_PREFIX QUANTX_AARCH64_SYSROOT)

set(CMAKE_C_COMPILER ${QUANTX_AARCH64_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${QUANTX_AARCH64_PREFIX}g++)

set(CMAKE_FIND_ROOT_PATH ${QUANTX_AARCH64_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Lets `ctest` (add_test) run the aarch64 binaries on the build machine.
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L ${QUANTX_AARCH64_SYSROOT})
