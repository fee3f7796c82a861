vmreplica_fuzzer(nbd_server_fuzzer
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/nbd_server_fuzzer.cc
  DEPS vmreplica_nbdserver)
