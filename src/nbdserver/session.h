// The NBD protocol state machine of one connection, without any socket I/O:
// it consumes the client's bytes and produces the server's bytes. The
// connection thread (nbd_server.cc), the unit tests and the fuzzer drive it.
//
//   (construction: greeting queued)
//        |
//        v
//   kClientFlags --bad flags--------------------------------> kClosed
//        | 4 bytes ok
//        v
//   kOptions --bad magic / oversize / ABORT / unknown EXPORT_NAME--> kClosed
//        |   (INFO, LIST, STRUCTURED_REPLY, *_META_CONTEXT, unknown:
//        |    reply, stay in kOptions)
//        | GO ok / EXPORT_NAME ok
//        v
//   kTransmission --DISC / bad magic / oversize WRITE----------> kClosed
//        (READ, FLUSH, BLOCK_STATUS, refused writes: reply, stay)
//
// Answers to every message: docs/nbd_server.md.
//
// Not thread-safe: one owner (the connection thread) drives it.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "nbdserver/export_table.h"

namespace vmreplica::nbd {

class Session {
 public:
  enum class Phase { kClientFlags, kOptions, kTransmission, kClosed };

  // Queues the server greeting. `exports` must outlive the session.
  explicit Session(const ExportTable* exports);

  // Appends client bytes to the input buffer.
  void Feed(const char* data, size_t n);
  void Feed(std::string_view bytes) { Feed(bytes.data(), bytes.size()); }

  // Handles at most one message from the buffered input (or a piece of a
  // refused WRITE payload), appending any reply to output(). Returns false
  // when it needs more input or the session is closed. The caller should
  // send the output after each true Step, which keeps the output buffer to
  // one reply.
  bool Step();

  // Runs Step() until it returns false.
  void StepAll() {
    while (Step()) {
    }
  }

  // Bytes to send to the client; the caller sends and clears them. Must
  // be sent even after the session closed (e.g. the ACK to NBD_OPT_ABORT).
  std::string* output() { return &out_; }

  Phase phase() const { return phase_; }
  bool closed() const { return phase_ == Phase::kClosed; }
  // Why the session closed ("" while open).
  const std::string& close_reason() const { return close_reason_; }
  // Export name in transmission ("" before).
  const std::string& export_name() const { return export_name_; }
  bool structured_replies() const { return structured_; }
  size_t buffered_input() const { return in_.size() - pos_; }

 private:
  void Close(std::string reason);
  void Consume(size_t n);

  // Negotiation.
  void HandleOption(uint32_t option, std::string_view data);
  void HandleExportName(std::string_view data);
  void HandleInfoOrGo(uint32_t option, std::string_view data);
  void HandleList(std::string_view data);
  void HandleMetaContext(uint32_t option, std::string_view data);
  void OptionReply(uint32_t option, uint32_t type, std::string_view data);
  void OptionError(uint32_t option, uint32_t type, std::string_view message);
  uint16_t TransmissionFlags() const;
  void EnterTransmission(const ExportEntry& entry);

  // Transmission.
  void HandleRequest(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset,
                     uint32_t length);
  void HandleRead(uint16_t flags, uint64_t cookie, uint64_t offset, uint32_t length);
  void HandleBlockStatus(uint16_t flags, uint64_t cookie, uint64_t offset, uint32_t length);
  void SimpleReply(uint64_t cookie, uint32_t error);
  // Structured error chunk when structured replies are on, else simple.
  void ErrorReply(uint64_t cookie, uint32_t error, std::string_view message);
  void ChunkHeader(uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length);

  const ExportTable* const exports_;

  Phase phase_ = Phase::kClientFlags;
  std::string close_reason_;
  std::string in_;
  size_t pos_ = 0;  // consumed prefix of in_
  std::string out_;

  bool no_zeroes_ = false;
  bool structured_ = false;
  // SET_META_CONTEXT selection and the export it was made for.
  bool base_allocation_ = false;
  std::string meta_export_;

  // Transmission.
  std::string export_name_;
  std::optional<ExportEntry> export_;
  uint64_t discard_remaining_ = 0;  // refused WRITE payload still to drop
  uint64_t discard_cookie_ = 0;
};

}  // namespace vmreplica::nbd
