# Locates the ONNX Runtime C/C++ headers, which the onnxruntime wheel does not ship:
#   1. -DONNXRUNTIME_INCLUDE_DIR=... or the environment variable of that name;
#   2. a system install (e.g. Debian's libonnxruntime-dev);
#   3. else fetch Debian trixie's libonnxruntime-dev (headers only, API 21) into the build tree.
set(ONNXRUNTIME_INCLUDE_DIR "${ONNXRUNTIME_INCLUDE_DIR}" CACHE PATH "ONNX Runtime headers")
if(NOT ONNXRUNTIME_INCLUDE_DIR AND DEFINED ENV{ONNXRUNTIME_INCLUDE_DIR})
  set(ONNXRUNTIME_INCLUDE_DIR "$ENV{ONNXRUNTIME_INCLUDE_DIR}" CACHE PATH "" FORCE)
endif()
if(NOT ONNXRUNTIME_INCLUDE_DIR)
  find_path(_qx_ort_sys onnxruntime_cxx_api.h PATH_SUFFIXES onnxruntime onnxruntime/core/session)
  if(_qx_ort_sys)
    set(ONNXRUNTIME_INCLUDE_DIR "${_qx_ort_sys}" CACHE PATH "" FORCE)
  endif()
endif()
if(NOT ONNXRUNTIME_INCLUDE_DIR)
  set(_qx_dest "${CMAKE_BINARY_DIR}/ort-headers")
  message(STATUS "ONNX Runtime headers not found: fetching Debian libonnxruntime-dev into ${_qx_dest}")
  execute_process(
    COMMAND bash "${CMAKE_CURRENT_LIST_DIR}/fetch_ort_headers.sh" "${_qx_dest}"
    RESULT_VARIABLE _qx_rc OUTPUT_VARIABLE _qx_out ERROR_VARIABLE _qx_err)
  if(NOT _qx_rc EQUAL 0)
    message(FATAL_ERROR "Could not fetch ONNX Runtime headers (${_qx_err}). Install "
                        "libonnxruntime-dev or pass -DONNXRUNTIME_INCLUDE_DIR=<dir with onnxruntime_cxx_api.h>.")
  endif()
  string(STRIP "${_qx_out}" _qx_out)
  set(ONNXRUNTIME_INCLUDE_DIR "${_qx_out}" CACHE PATH "" FORCE)
endif()
if(NOT EXISTS "${ONNXRUNTIME_INCLUDE_DIR}/onnxruntime_cxx_api.h")
  message(FATAL_ERROR "ONNXRUNTIME_INCLUDE_DIR=${ONNXRUNTIME_INCLUDE_DIR} has no onnxruntime_cxx_api.h")
endif()
message(STATUS "ONNX Runtime headers: ${ONNXRUNTIME_INCLUDE_DIR}")
