// The reverse records (docs/failover.md section 15.2).
#include <algorithm>
#include <cctype>
#include <set>

#include "reverse/range_list.h"
#include "vmreplica/fileutil.h"

namespace vmreplica {

namespace {

using nlohmann::json;

bool IsUuidText(const std::string& s) {
  if (s.size() != 36) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (c != '-') return false;
    } else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) {
      return false;
    }
  }
  return true;
}


// Absolute, without ".", ".." or empty components, no trailing '/', not "/".
bool IsCleanAbsolutePath(const std::string& s) {
  if (s.size() < 2 || s.size() > 4096 || s[0] != '/' || s.back() == '/') return false;
  if (s.find('\0') != std::string::npos) return false;
  size_t start = 1;
  while (start <= s.size()) {
    size_t end = s.find('/', start);
    if (end == std::string::npos) end = s.size();
    const std::string part = s.substr(start, end - start);
    if (part.empty() || part == "." || part == "..") return false;
    start = end + 1;
  }
  return true;
}

bool IsPrintableName(const std::string& s) {
  if (s.empty() || s.size() > 255) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return c > ' ' && c < 0x7f; });
}

// Member access with the record's name in every error.
class Members {
 public:
  Members(const json& j, std::string what) : j_(j), what_(std::move(what)) {}
  Status Bad(const std::string& member, const std::string& why) const {
    return Status::Corruption(what_ + ": member '" + member + "' " + why);
  }
  Result<std::string> Str(const char* k) const {
    if (!j_.contains(k) || !j_[k].is_string()) return Bad(k, "is missing or not a string");
    return j_[k].get<std::string>();
  }
  // `prefix` names the object holding `k` in messages ("claim.").
  Result<uint64_t> Unsigned(const json& j, const std::string& k, const std::string& prefix) const {
    if (!j.contains(k) || !j[k].is_number_unsigned()) {
      return Bad(prefix + k, "is missing or not an unsigned integer");
    }
    return j[k].get<uint64_t>();
  }
  Result<bool> Bool(const char* k) const {
    if (!j_.contains(k) || !j_[k].is_boolean()) return Bad(k, "is missing or not a boolean");
    return j_[k].get<bool>();
  }
  // Only `allowed` members may appear.
  Status OnlyKnown(const std::set<std::string>& allowed) const {
    for (auto it = j_.begin(); it != j_.end(); ++it) {
      if (!allowed.count(it.key())) return Bad(it.key(), "does not belong to this record");
    }
    return Status::Ok();
  }
  const json& j() const { return j_; }

 private:
  const json& j_;
  std::string what_;
};

json EncodeClaim(const ReverseClaim& c) {
  json j;
  j["generation"] = GenerationHex(c.generation);
  j["common_sequence"] = c.common_sequence;
  j["tracking"] = c.tracking_intact ? uint64_t{1} : uint64_t{2};
  j["candidate_bytes"] = c.candidate_bytes;
  j["local_copy_bytes"] = c.local_copy_bytes;
  return j;
}

Result<std::optional<ReverseClaim>> DecodeClaim(const Members& m) {
  if (!m.j().contains("claim")) return std::optional<ReverseClaim>();
  const json& c = m.j()["claim"];
  if (!c.is_object()) return m.Bad("claim", "is not an object");
  for (auto it = c.begin(); it != c.end(); ++it) {
    static const std::set<std::string> kKnown = {"generation", "common_sequence", "tracking", "candidate_bytes",
                                                 "local_copy_bytes"};
    if (!kKnown.count(it.key())) return m.Bad("claim." + it.key(), "does not belong to a claim");
  }
  ReverseClaim out;
  if (!c.contains("generation") || !c["generation"].is_string()) {
    return m.Bad("claim.generation", "is missing or not a string");
  }
  const std::string g = c["generation"].get<std::string>();
  const bool hex = g.size() == 32 && std::all_of(g.begin(), g.end(), [](char x) {
                     return (x >= '0' && x <= '9') || (x >= 'a' && x <= 'f');
                   });
  if (!hex) return m.Bad("claim.generation", "is not 32 lower-case hex digits");
  VMR_ASSIGN_OR_RETURN(out.generation, ParseGenerationHex(g));
  VMR_ASSIGN_OR_RETURN(out.common_sequence, m.Unsigned(c, "common_sequence", "claim."));
  VMR_ASSIGN_OR_RETURN(uint64_t tracking, m.Unsigned(c, "tracking", "claim."));
  if (tracking != 1 && tracking != 2) return m.Bad("claim.tracking", "is neither 1 (intact) nor 2 (lost)");
  out.tracking_intact = tracking == 1;
  VMR_ASSIGN_OR_RETURN(out.candidate_bytes, m.Unsigned(c, "candidate_bytes", "claim."));
  VMR_ASSIGN_OR_RETURN(out.local_copy_bytes, m.Unsigned(c, "local_copy_bytes", "claim."));
  return std::optional<ReverseClaim>(out);
}

// The members both records share.
struct Common {
  std::string purpose, vm_id, request_id, phase;
};

Result<Common> DecodeCommon(const Members& m, const std::string& side, const std::set<std::string>& phases) {
  const json& j = m.j();
  if (!j.contains("version") || !j["version"].is_number_unsigned() || j["version"].get<uint64_t>() != 1) {
    return m.Bad("version", "is not 1");
  }
  VMR_ASSIGN_OR_RETURN(std::string s, m.Str("side"));
  if (s != side) return m.Bad("side", "is '" + s + "', expected '" + side + "'");
  Common c;
  VMR_ASSIGN_OR_RETURN(c.purpose, m.Str("purpose"));
  if (c.purpose != "reverse" && c.purpose != "failback") return m.Bad("purpose", "is neither 'reverse' nor 'failback'");
  VMR_ASSIGN_OR_RETURN(c.vm_id, m.Str("vm_id"));
  if (!IsUuidText(c.vm_id)) return m.Bad("vm_id", "is not a lower-case UUID");
  VMR_ASSIGN_OR_RETURN(c.request_id, m.Str("request_id"));
  if (!IsUuidText(c.request_id)) return m.Bad("request_id", "is not a lower-case UUID");
  VMR_ASSIGN_OR_RETURN(c.phase, m.Str("phase"));
  if (!phases.count(c.phase)) return m.Bad("phase", "'" + c.phase + "' is not a phase of this record");
  return c;
}

}  // namespace

// "host:port" or "[v6]:port": host of [A-Za-z0-9.-] (1..253) or a bracketed
// literal of hex digits, ':' and '.'; port 1..65535 in decimal.
bool IsHostPort(const std::string& s) {
  const size_t colon = s.rfind(':');
  if (colon == std::string::npos || colon == 0) return false;
  const std::string host = s.substr(0, colon);
  const std::string port = s.substr(colon + 1);
  if (port.empty() || port.size() > 5 || port[0] == '0') return false;
  for (char c : port) {
    if (c < '0' || c > '9') return false;
  }
  if (std::stoul(port) > 65535) return false;
  if (host.front() == '[') {
    if (host.size() < 4 || host.back() != ']') return false;
    for (size_t i = 1; i + 1 < host.size(); ++i) {
      const char c = host[i];
      if (!std::isxdigit(static_cast<unsigned char>(c)) && c != ':' && c != '.') return false;
    }
    return true;
  }
  if (host.size() > 253) return false;
  for (char c : host) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-') return false;
  }
  return true;
}

std::string ReverseSendRecordPath(const std::string& state_dir, const std::string& vm_id) {
  return state_dir + "/reverse/" + vm_id + ".send.json";
}
std::string ReverseRecvRecordPath(const std::string& state_dir, const std::string& vm_id) {
  return state_dir + "/reverse/" + vm_id + ".recv.json";
}
std::string ReverseAcandPath(const std::string& state_dir, const std::string& vm_id) {
  return state_dir + "/reverse/" + vm_id + ".acand";
}

json ReverseSendRecord::Encode() const {
  json j;
  j["version"] = uint64_t{1};
  j["side"] = "sender";
  j["purpose"] = purpose;
  j["vm_id"] = vm_id;
  j["request_id"] = request_id;
  j["phase"] = phase;
  j["target"] = target;
  if (claim) j["claim"] = EncodeClaim(*claim);
  return j;
}

Result<ReverseSendRecord> ReverseSendRecord::Decode(const json& j, const std::string& state_dir) {
  (void)state_dir;  // nothing of a sender record lies in the state directory
  if (!j.is_object()) return Status::Corruption("reverse sender record is not a JSON object");
  Members m(j, "reverse sender record");
  VMR_RETURN_IF_ERROR(m.OnlyKnown({"version", "side", "purpose", "vm_id", "request_id", "phase", "target", "claim"}));
  VMR_ASSIGN_OR_RETURN(Common c, DecodeCommon(m, "sender", {"started", "peer", "switched"}));
  ReverseSendRecord r;
  r.purpose = std::move(c.purpose);
  r.vm_id = std::move(c.vm_id);
  r.request_id = std::move(c.request_id);
  r.phase = std::move(c.phase);
  VMR_ASSIGN_OR_RETURN(r.target, m.Str("target"));
  if (!IsHostPort(r.target)) return m.Bad("target", "'" + r.target + "' is not host:port");
  VMR_ASSIGN_OR_RETURN(r.claim, DecodeClaim(m));
  if (r.phase == "switched" && !r.claim) return m.Bad("claim", "is missing in phase 'switched'");
  return r;
}

json ReverseRecvRecord::Encode() const {
  json j;
  j["version"] = uint64_t{1};
  j["side"] = "receiver";
  j["purpose"] = purpose;
  j["vm_id"] = vm_id;
  j["request_id"] = request_id;
  j["phase"] = phase;
  j["caller_names"] = caller_names;
  if (claim) j["claim"] = EncodeClaim(*claim);
  j["store_dir"] = store_dir;
  j["created_dir"] = created_dir;
  j["acand_file"] = acand_file;
  return j;
}

Result<ReverseRecvRecord> ReverseRecvRecord::Decode(const json& j, const std::string& state_dir) {
  if (!j.is_object()) return Status::Corruption("reverse receiver record is not a JSON object");
  Members m(j, "reverse receiver record");
  VMR_RETURN_IF_ERROR(m.OnlyKnown({"version", "side", "purpose", "vm_id", "request_id", "phase", "caller_names",
                                   "claim", "store_dir", "created_dir", "acand_file"}));
  VMR_ASSIGN_OR_RETURN(Common c, DecodeCommon(m, "receiver", {"inspecting", "adopting", "switched"}));
  ReverseRecvRecord r;
  r.purpose = std::move(c.purpose);
  r.vm_id = std::move(c.vm_id);
  r.request_id = std::move(c.request_id);
  r.phase = std::move(c.phase);
  if (!j.contains("caller_names") || !j["caller_names"].is_array() || j["caller_names"].empty() ||
      j["caller_names"].size() > 64) {
    return m.Bad("caller_names", "is not an array of 1..64 names");
  }
  for (const json& n : j["caller_names"]) {
    if (!n.is_string() || !IsPrintableName(n.get<std::string>())) {
      return m.Bad("caller_names", "holds a name that is not 1..255 printable characters");
    }
    r.caller_names.push_back(n.get<std::string>());
  }
  VMR_ASSIGN_OR_RETURN(r.claim, DecodeClaim(m));
  if (r.phase == "switched" && !r.claim) return m.Bad("claim", "is missing in phase 'switched'");
  VMR_ASSIGN_OR_RETURN(r.store_dir, m.Str("store_dir"));
  VMR_ASSIGN_OR_RETURN(r.created_dir, m.Bool("created_dir"));
  if (r.store_dir.empty()) {
    if (r.phase != "inspecting") return m.Bad("store_dir", "is empty in phase '" + r.phase + "'");
    if (r.created_dir) return m.Bad("created_dir", "is true without a store_dir");
  } else if (!IsCleanAbsolutePath(r.store_dir)) {
    return m.Bad("store_dir", "'" + r.store_dir + "' is not a normalised absolute path");
  }
  VMR_ASSIGN_OR_RETURN(r.acand_file, m.Str("acand_file"));
  if (r.acand_file != ReverseAcandPath(state_dir, r.vm_id)) {
    return m.Bad("acand_file", "'" + r.acand_file + "' is not " + ReverseAcandPath(state_dir, r.vm_id));
  }
  return r;
}

Status WriteReverseRecord(const std::string& path, const json& record) {
  const std::string text = record.dump(2) + "\n";
  if (text.size() > kReverseRecordMaxBytes) {
    return Status::InvalidArgument("reverse record for " + path + " is " + std::to_string(text.size()) +
                                   " bytes, over 64 KiB");
  }
  return WriteFileAtomic(path, text, 0600);
}

Result<json> ReadReverseRecord(const std::string& path) {
  auto text = ReadFile(path, kReverseRecordMaxBytes);
  if (!text.ok()) {
    if (text.status().code() == Code::kInvalidArgument) {
      return Status::Corruption("reverse record " + path + " is over 64 KiB");
    }
    return text.status();
  }
  json j = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Status::Corruption("reverse record " + path + " is not a JSON object");
  return j;
}

}  // namespace vmreplica
