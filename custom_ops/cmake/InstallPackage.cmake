# `cmake --install` layout for C/C++ programs (not used by the Python wheel):
#   lib/libquantx_ops.so            the custom-op library ONNX Runtime loads (RegisterCustomOps)
#   lib/libquantx_ops_static.a      static registration (QuantxRegisterCustomOps), kernels inside
#   include/quantx/quantx_ops.h     declarations of the static entry
#   lib/cmake/quantx_ops/           package config: find_package(quantx_ops CONFIG REQUIRED)
#                                   gives quantx::quantx_ops and quantx::quantx_ops_static
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(_qx_targets quantx_ops)
if(TARGET quantx_ops_static)
  list(APPEND _qx_targets quantx_ops_static)
endif()
foreach(_t IN LISTS _qx_targets)
  target_include_directories(${_t} INTERFACE $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
endforeach()

install(TARGETS ${_qx_targets} EXPORT quantx_opsTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES ${CMAKE_CURRENT_SOURCE_DIR}/include/quantx/quantx_ops.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/quantx)

set(_qx_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/quantx_ops)
install(EXPORT quantx_opsTargets NAMESPACE quantx:: DESTINATION ${_qx_cmake_dir})
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/quantx_opsConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/quantx_opsConfig.cmake INSTALL_DESTINATION ${_qx_cmake_dir})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/quantx_opsConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/quantx_opsConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/quantx_opsConfigVersion.cmake DESTINATION ${_qx_cmake_dir})
