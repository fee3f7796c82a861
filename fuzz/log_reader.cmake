# Delta log reader (src/logformat, docs/log_format.md). Seed corpus in
# fuzz/corpus/log_reader_fuzzer/, written by logformat_test:
#   VMREPLICA_LOG_SEED_DIR=fuzz/corpus/log_reader_fuzzer build/.../logformat_test --gtest_filter='*Seed*'
vmreplica_fuzzer(log_reader_fuzzer SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/log_reader_fuzzer.cc DEPS vmreplica_logformat)
