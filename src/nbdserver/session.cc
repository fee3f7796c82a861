#include "nbdserver/session.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "nbdserver/protocol.h"

namespace vmreplica::nbd {
namespace {

constexpr size_t kOptionHeaderSize = 16;
constexpr uint32_t kBaseAllocationId = 1;  // context id after SET_META_CONTEXT

// Reads a u32-length-prefixed string from `data` at `*pos`; false when it
// overruns `data` or exceeds kMaxNameLength.
bool ReadString(std::string_view data, size_t* pos, std::string* out) {
  if (data.size() - *pos < 4) return false;
  uint32_t len = GetU32(data.data() + *pos);
  *pos += 4;
  if (len > kMaxNameLength || data.size() - *pos < len) return false;
  out->assign(data.data() + *pos, len);
  *pos += len;
  return true;
}

}  // namespace

Session::Session(const ExportTable* exports) : exports_(exports) {
  PutU64(&out_, kNbdMagic);
  PutU64(&out_, kOptionMagic);
  PutU16(&out_, kFlagFixedNewstyle | kFlagNoZeroes);
}

void Session::Feed(const char* data, size_t n) {
  if (closed()) return;
  // Drop the consumed prefix before growing the buffer.
  if (pos_ > 0 && (pos_ == in_.size() || pos_ >= 64 * 1024)) {
    in_.erase(0, pos_);
    pos_ = 0;
  }
  in_.append(data, n);
}

void Session::Consume(size_t n) { pos_ += n; }

void Session::Close(std::string reason) {
  if (closed()) return;
  spdlog::debug("nbd session closed: {}", reason);
  phase_ = Phase::kClosed;
  close_reason_ = std::move(reason);
  in_.clear();
  pos_ = 0;
  discard_remaining_ = 0;
}

bool Session::Step() {
  if (closed()) return false;
  const size_t avail = in_.size() - pos_;
  const char* p = in_.data() + pos_;

  if (discard_remaining_ > 0) {
    if (avail == 0) return false;
    size_t n = static_cast<size_t>(std::min<uint64_t>(avail, discard_remaining_));
    Consume(n);
    discard_remaining_ -= n;
    if (discard_remaining_ == 0) {
      ErrorReply(discard_cookie_, kEperm, "read-only export");
    }
    return true;
  }

  switch (phase_) {
    case Phase::kClientFlags: {
      if (avail < 4) return false;
      uint32_t flags = GetU32(p);
      Consume(4);
      if ((flags & ~(kClientFlagFixedNewstyle | kClientFlagNoZeroes)) != 0) {
        Close("unknown client flags");
      } else if ((flags & kClientFlagFixedNewstyle) == 0) {
        Close("client does not speak fixed newstyle");
      } else {
        no_zeroes_ = (flags & kClientFlagNoZeroes) != 0;
        phase_ = Phase::kOptions;
      }
      return true;
    }
    case Phase::kOptions: {
      if (avail < kOptionHeaderSize) return false;
      uint64_t magic = GetU64(p);
      uint32_t option = GetU32(p + 8);
      uint32_t length = GetU32(p + 12);
      if (magic != kOptionMagic) {
        Close("bad option magic");
        return true;
      }
      if (length > kMaxOptionLength) {
        Close("option " + std::to_string(option) + " too long: " + std::to_string(length));
        return true;
      }
      if (avail - kOptionHeaderSize < length) return false;
      // Copy: handlers may append to out_ but never touch in_; still, keep
      // the view independent of the buffer.
      std::string data(p + kOptionHeaderSize, length);
      Consume(kOptionHeaderSize + length);
      HandleOption(option, data);
      return true;
    }
    case Phase::kTransmission: {
      if (avail < kRequestHeaderSize) return false;
      uint32_t magic = GetU32(p);
      uint16_t flags = GetU16(p + 4);
      uint16_t type = GetU16(p + 6);
      uint64_t cookie = GetU64(p + 8);
      uint64_t offset = GetU64(p + 16);
      uint32_t length = GetU32(p + 24);
      Consume(kRequestHeaderSize);
      if (magic != kRequestMagic) {
        Close("bad request magic");
        return true;
      }
      HandleRequest(flags, type, cookie, offset, length);
      return true;
    }
    case Phase::kClosed:
      return false;
  }
  return false;
}

// ---------------------------------------------------------------------------
// Negotiation

void Session::OptionReply(uint32_t option, uint32_t type, std::string_view data) {
  PutU64(&out_, kOptionReplyMagic);
  PutU32(&out_, option);
  PutU32(&out_, type);
  PutU32(&out_, static_cast<uint32_t>(data.size()));
  out_.append(data);
}

void Session::OptionError(uint32_t option, uint32_t type, std::string_view message) {
  spdlog::debug("nbd option {} refused: {}", option, message);
  OptionReply(option, type, message);
}

uint16_t Session::TransmissionFlags() const {
  uint16_t flags = kTxHasFlags | kTxReadOnly | kTxSendFlush | kTxCanMultiConn;
  if (structured_) flags |= kTxSendDf;
  return flags;
}

void Session::EnterTransmission(const ExportEntry& entry) {
  if (meta_export_ != entry.name) base_allocation_ = false;
  export_name_ = entry.name;
  export_ = entry;
  phase_ = Phase::kTransmission;
  spdlog::debug("nbd session in transmission on export {}", entry.name);
}

void Session::HandleOption(uint32_t option, std::string_view data) {
  switch (option) {
    case kOptExportName:
      HandleExportName(data);
      return;
    case kOptAbort:
      OptionReply(option, kRepAck, {});
      Close("client sent NBD_OPT_ABORT");
      return;
    case kOptList:
      HandleList(data);
      return;
    case kOptInfo:
    case kOptGo:
      HandleInfoOrGo(option, data);
      return;
    case kOptStructuredReply:
      if (!data.empty()) {
        OptionError(option, kRepErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data");
        return;
      }
      structured_ = true;
      OptionReply(option, kRepAck, {});
      return;
    case kOptListMetaContext:
    case kOptSetMetaContext:
      HandleMetaContext(option, data);
      return;
    default:
      OptionError(option, kRepErrUnsup, "option not supported");
      return;
  }
}

void Session::HandleExportName(std::string_view data) {
  // No error reply exists for this option: an unknown name ends the session.
  std::optional<ExportEntry> entry;
  if (data.size() <= kMaxNameLength) entry = exports_->Find(std::string(data));
  if (!entry) {
    Close("NBD_OPT_EXPORT_NAME for an unknown export");
    return;
  }
  PutU64(&out_, entry->source->size());
  PutU16(&out_, TransmissionFlags());
  if (!no_zeroes_) out_.append(124, '\0');
  EnterTransmission(*entry);
}

void Session::HandleList(std::string_view data) {
  if (!data.empty()) {
    OptionError(kOptList, kRepErrInvalid, "NBD_OPT_LIST takes no data");
    return;
  }
  for (const ExportEntry& e : exports_->List()) {
    std::string payload;
    PutU32(&payload, static_cast<uint32_t>(e.name.size()));
    payload += e.name;
    payload += e.description;
    OptionReply(kOptList, kRepServer, payload);
  }
  OptionReply(kOptList, kRepAck, {});
}

void Session::HandleInfoOrGo(uint32_t option, std::string_view data) {
  size_t pos = 0;
  std::string name;
  if (!ReadString(data, &pos, &name) || data.size() - pos < 2) {
    OptionError(option, kRepErrInvalid, "malformed export name");
    return;
  }
  uint16_t nreq = GetU16(data.data() + pos);
  pos += 2;
  if (data.size() - pos != static_cast<size_t>(nreq) * 2) {
    OptionError(option, kRepErrInvalid, "information request count does not match length");
    return;
  }
  bool want_name = false, want_description = false;
  for (uint16_t i = 0; i < nreq; ++i) {
    uint16_t item = GetU16(data.data() + pos + 2 * i);
    if (item == kInfoName) want_name = true;
    if (item == kInfoDescription) want_description = true;
  }
  std::optional<ExportEntry> entry = exports_->Find(name);
  if (!entry) {
    OptionError(option, kRepErrUnknown, "unknown export");
    return;
  }
  std::string info;
  PutU16(&info, kInfoExport);
  PutU64(&info, entry->source->size());
  PutU16(&info, TransmissionFlags());
  OptionReply(option, kRepInfo, info);
  if (want_name) {
    info.clear();
    PutU16(&info, kInfoName);
    info += entry->name;
    OptionReply(option, kRepInfo, info);
  }
  if (want_description && !entry->description.empty()) {
    info.clear();
    PutU16(&info, kInfoDescription);
    info += entry->description;
    OptionReply(option, kRepInfo, info);
  }
  // Block sizes are always sent: any alignment works, 4 KiB is preferred,
  // requests up to kMaxRequestLength are served.
  info.clear();
  PutU16(&info, kInfoBlockSize);
  PutU32(&info, 1);
  PutU32(&info, kPreferredBlockSize);
  PutU32(&info, kMaxRequestLength);
  OptionReply(option, kRepInfo, info);
  OptionReply(option, kRepAck, {});
  if (option == kOptGo) EnterTransmission(*entry);
}

void Session::HandleMetaContext(uint32_t option, std::string_view data) {
  const bool set = option == kOptSetMetaContext;
  if (!structured_) {
    OptionError(option, kRepErrInvalid, "structured replies not negotiated");
    return;
  }
  size_t pos = 0;
  std::string name;
  if (!ReadString(data, &pos, &name) || data.size() - pos < 4) {
    OptionError(option, kRepErrInvalid, "malformed export name");
    return;
  }
  uint32_t nq = GetU32(data.data() + pos);
  pos += 4;
  if (nq > kMaxMetaQueries) {
    OptionError(option, kRepErrTooBig, "too many meta context queries");
    return;
  }
  std::vector<std::string> queries(nq);
  for (uint32_t i = 0; i < nq; ++i) {
    if (!ReadString(data, &pos, &queries[i])) {
      OptionError(option, kRepErrInvalid, "malformed meta context query");
      return;
    }
  }
  if (pos != data.size()) {
    OptionError(option, kRepErrInvalid, "trailing bytes after meta context queries");
    return;
  }
  if (!exports_->Find(name)) {
    OptionError(option, kRepErrUnknown, "unknown export");
    return;
  }
  bool match = false;
  if (set) {
    for (const std::string& q : queries) match |= q == kBaseAllocation;
    base_allocation_ = match;
    meta_export_ = name;
  } else {
    match = nq == 0;
    for (const std::string& q : queries) match |= q == kBaseAllocation || q == "base:";
  }
  if (match) {
    std::string payload;
    PutU32(&payload, set ? kBaseAllocationId : 0);
    payload += kBaseAllocation;
    OptionReply(option, kRepMetaContext, payload);
  }
  OptionReply(option, kRepAck, {});
}

// ---------------------------------------------------------------------------
// Transmission

void Session::SimpleReply(uint64_t cookie, uint32_t error) {
  PutU32(&out_, kSimpleReplyMagic);
  PutU32(&out_, error);
  PutU64(&out_, cookie);
}

void Session::ChunkHeader(uint16_t flags, uint16_t type, uint64_t cookie, uint32_t length) {
  PutU32(&out_, kStructuredReplyMagic);
  PutU16(&out_, flags);
  PutU16(&out_, type);
  PutU64(&out_, cookie);
  PutU32(&out_, length);
}

void Session::ErrorReply(uint64_t cookie, uint32_t error, std::string_view message) {
  if (!structured_) {
    SimpleReply(cookie, error);
    return;
  }
  message = message.substr(0, 1024);
  ChunkHeader(kReplyFlagDone, kReplyTypeError, cookie, static_cast<uint32_t>(6 + message.size()));
  PutU32(&out_, error);
  PutU16(&out_, static_cast<uint16_t>(message.size()));
  out_.append(message);
}

void Session::HandleRequest(uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset,
                            uint32_t length) {
  if (type == kCmdWrite) {
    // The payload follows the header: drop it, then refuse.
    if (length > kMaxRequestLength) {
      Close("NBD_CMD_WRITE payload too long: " + std::to_string(length));
      return;
    }
    if (length == 0) {
      ErrorReply(cookie, kEperm, "read-only export");
      return;
    }
    discard_remaining_ = length;
    discard_cookie_ = cookie;
    return;
  }
  if ((flags & ~kKnownCmdFlags) != 0) {
    ErrorReply(cookie, kEinval, "unknown command flags");
    return;
  }
  switch (type) {
    case kCmdRead:
      HandleRead(flags, cookie, offset, length);
      return;
    case kCmdDisc:
      Close("client sent NBD_CMD_DISC");
      return;
    case kCmdFlush:
      SimpleReply(cookie, 0);
      return;
    case kCmdTrim:
    case kCmdWriteZeroes:
      ErrorReply(cookie, kEperm, "read-only export");
      return;
    case kCmdBlockStatus:
      HandleBlockStatus(flags, cookie, offset, length);
      return;
    default:
      ErrorReply(cookie, kEinval, "command not supported");
      return;
  }
}

void Session::HandleRead(uint16_t /*flags*/, uint64_t cookie, uint64_t offset, uint32_t length) {
  ExportSource* source = export_->source.get();
  const uint64_t size = source->size();
  if (length == 0 || length > kMaxRequestLength) {
    ErrorReply(cookie, kEinval, "read length out of range");
    return;
  }
  if (offset > size || length > size - offset) {
    ErrorReply(cookie, kEinval, "read beyond the end of the export");
    return;
  }
  const size_t mark = out_.size();
  if (structured_) {
    ChunkHeader(kReplyFlagDone, kReplyTypeOffsetData, cookie, 8 + length);
    PutU64(&out_, offset);
  } else {
    SimpleReply(cookie, 0);
  }
  const size_t data_at = out_.size();
  out_.resize(data_at + length);
  Status st = source->Read(offset, length, out_.data() + data_at);
  if (!st.ok()) {
    spdlog::warn("nbd export {}: read {}+{} failed: {}", export_name_, offset, length,
                 st.ToString());
    out_.resize(mark);
    ErrorReply(cookie, kEio, "read failed");
  }
}

void Session::HandleBlockStatus(uint16_t flags, uint64_t cookie, uint64_t offset, uint32_t length) {
  if (!base_allocation_) {
    ErrorReply(cookie, kEinval, "no meta context negotiated");
    return;
  }
  ExportSource* source = export_->source.get();
  const uint64_t size = source->size();
  if (length == 0 || offset > size || length > size - offset) {
    ErrorReply(cookie, kEinval, "block status range out of the export");
    return;
  }
  Result<std::vector<Extent>> extents = source->Extents(offset, length);
  if (!extents.ok()) {
    spdlog::warn("nbd export {}: extents {}+{} failed: {}", export_name_, offset, length,
                 extents.status().ToString());
    ErrorReply(cookie, kEio, "block status failed");
    return;
  }
  const size_t max_count = (flags & kCmdFlagReqOne) != 0 ? 1 : kMaxExtentsPerReply;
  std::string desc;
  uint64_t covered = 0;
  size_t count = 0;
  for (const Extent& e : *extents) {
    if (count == max_count || covered >= length) break;
    uint64_t len = std::min<uint64_t>(e.length, length - covered);
    if (len == 0) continue;
    PutU32(&desc, static_cast<uint32_t>(len));  // <= length, a u32
    PutU32(&desc, (e.hole ? kStateHole : 0) | (e.zero ? kStateZero : 0));
    covered += len;
    ++count;
  }
  if (count == 0) {
    ErrorReply(cookie, kEio, "export source returned no extents");
    return;
  }
  ChunkHeader(kReplyFlagDone, kReplyTypeBlockStatus, cookie,
              static_cast<uint32_t>(4 + desc.size()));
  PutU32(&out_, kBaseAllocationId);
  out_ += desc;
}

}  // namespace vmreplica::nbd
