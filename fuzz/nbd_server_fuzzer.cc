// Feeds the fuzzer input as a client's byte stream to an NBD Session over
// in-memory exports. The session must never crash, hang or grow its buffers
// without bound, whatever the client sends (docs/nbd_server.md).
#include <spdlog/spdlog.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "nbdserver/export_table.h"
#include "nbdserver/memory_export_source.h"
#include "nbdserver/protocol.h"
#include "nbdserver/session.h"

using vmreplica::nbd::ExportTable;
using vmreplica::nbd::MemoryExportSource;
using vmreplica::nbd::Session;

namespace {

const ExportTable& Exports() {
  static ExportTable* table = [] {
    spdlog::set_level(spdlog::level::off);
    auto* t = new ExportTable();
    std::string bytes(256 * 1024, '\0');
    for (size_t i = 0; i < 8192; ++i) bytes[i] = static_cast<char>(i | 1);
    for (size_t i = 100000; i < 110000; ++i) bytes[i] = 'd';
    if (!t->Add({"a", "fuzz disk", std::make_shared<MemoryExportSource>(bytes)}).ok() ||
        !t->Add({"b", "", std::make_shared<MemoryExportSource>("tiny")}).ok()) {
      std::abort();
    }
    return t;
  }();
  return *table;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  // The first byte picks the chunk size the bytes arrive in.
  const size_t chunk = (data[0] % 64) + 1;
  const char* p = reinterpret_cast<const char*>(data + 1);
  size_t left = size - 1;
  Session session(&Exports());
  while (left > 0 && !session.closed()) {
    size_t n = left < chunk ? left : chunk;
    session.Feed(p, n);
    p += n;
    left -= n;
    while (session.Step()) {
      // One reply at most per step: the bound the connection thread relies on.
      if (session.output()->size() > vmreplica::nbd::kMaxRequestLength + 4096) std::abort();
      session.output()->clear();
    }
    if (session.buffered_input() > vmreplica::nbd::kMaxOptionLength + 64 * 1024 + 64) {
      std::abort();
    }
  }
  return 0;
}
