#include "vmreplica/staging.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <map>
#include <tuple>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>

#include <nlohmann/json.hpp>

#include "replica/text_checks.h"
#include "vmreplica/fileutil.h"

namespace vmreplica {
namespace {

namespace fs = std::filesystem;

constexpr const char* kLogSuffix = ".vrl";
constexpr const char* kPartSuffix = ".vrl.part";
constexpr const char* kRejectedDir = "rejected";
constexpr const char* kImportFile = "IMPORT";
// A valid IMPORT is about 80 bytes.
constexpr size_t kMaxImportFile = 1024;

using replica_internal::IsHex32;

// The generation of an IMPORT file's bytes; every field checked.
Result<std::string> DecodeImport(const std::string& bytes, const std::string& path) {
  auto bad = [&](const std::string& why) { return Status::Corruption("import reservation " + path + ": " + why); };
  if (bytes.size() > kMaxImportFile) return bad("larger than 1024 bytes");
  nlohmann::json j = nlohmann::json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  if (j.size() != 3 || !j.contains("version") || !j.contains("sequence") || !j.contains("generation"))
    return bad("fields must be exactly version, sequence and generation");
  if (!j["version"].is_number_unsigned() || j["version"].get<uint64_t>() != 1) return bad("version is not 1");
  if (!j["sequence"].is_number_unsigned() || j["sequence"].get<uint64_t>() != 1) return bad("sequence is not 1");
  if (!j["generation"].is_string() || !IsHex32(j["generation"].get<std::string>()))
    return bad("generation is not 32 hex digits");
  return j["generation"].get<std::string>();
}

std::string SeqName(uint64_t sequence) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%020llu", static_cast<unsigned long long>(sequence));
  return buf;
}

std::string Hex(const GenerationId& id) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  for (uint8_t b : id) {
    out.push_back(kDigits[b >> 4]);
    out.push_back(kDigits[b & 15]);
  }
  return out;
}

Status Errno(const std::string& what, const std::string& path) {
  return Status::IOError(what + " " + path + ": " + std::strerror(errno));
}

bool Exists(const std::string& path) {
  std::error_code ec;
  return fs::exists(path, ec);
}

Status Unlink(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Errno("unlink", path);
  return Status::Ok();
}

Status FsyncFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Errno("open", path);
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return Errno("fsync", path);
  return Status::Ok();
}

// Parses "<20 digits><suffix>"; false for any other name.
bool ParseName(const std::string& name, const std::string& suffix, uint64_t* sequence) {
  if (name.size() != 20 + suffix.size() || name.compare(20, std::string::npos, suffix) != 0) return false;
  uint64_t v = 0;
  for (size_t i = 0; i < 20; ++i) {
    char c = name[i];
    if (c < '0' || c > '9') return false;
    uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (UINT64_MAX - d) / 10) return false;
    v = v * 10 + d;
  }
  *sequence = v;
  return true;
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The files of one staging directory that have catalog rows.
struct StagedFile {
  std::string file_name;  // relative to the staging dir
  uint64_t size = 0;
  int64_t mtime_ms = 0;
};

Status ListLogs(const std::string& dir, const std::string& prefix, StagedLogState state,
                std::map<std::pair<uint64_t, StagedLogState>, StagedFile>* out) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return Status::Ok();
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    uint64_t seq = 0;
    if (!ParseName(name, kLogSuffix, &seq)) continue;
    struct stat st {};
    if (::stat(it->path().c_str(), &st) != 0) {
      if (errno == ENOENT) continue;
      return Errno("stat", it->path().string());
    }
    if (!S_ISREG(st.st_mode)) continue;
    StagedFile f;
    f.file_name = prefix + name;
    f.size = static_cast<uint64_t>(st.st_size);
    f.mtime_ms = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000 + st.st_mtim.tv_nsec / 1000000;
    (*out)[{seq, state}] = f;
  }
  if (ec) return Status::IOError("list " + dir + ": " + ec.message());
  return Status::Ok();
}

}  // namespace

Staging::Staging(std::string dir, const ReplicaStore& store, StagingOptions options)
    : dir_(std::move(dir)), store_(&store), options_(std::move(options)) {}

Staging::~Staging() = default;

std::string Staging::LogPath(uint64_t sequence) const { return dir_ + "/" + SeqName(sequence) + kLogSuffix; }

Result<std::unique_ptr<Staging>> Staging::Open(const std::string& dir, const ReplicaStore& store,
                                               StagingOptions options) {
  VMR_RETURN_IF_ERROR(MakeDirs(dir, 0700));
  std::error_code ec;
  bool removed = false;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    uint64_t seq = 0;
    if (!ParseName(name, kPartSuffix, &seq)) continue;
    spdlog::info("staging {}: removing unfinished receive {}", dir, name);
    VMR_RETURN_IF_ERROR(Unlink(it->path().string()));
    removed = true;
  }
  if (ec) return Status::IOError("list " + dir + ": " + ec.message());
  if (removed) VMR_RETURN_IF_ERROR(FsyncParentDir(dir + "/x"));
  std::unique_ptr<Staging> staging(new Staging(dir, store, std::move(options)));
  VMR_RETURN_IF_ERROR(staging->import_reservation().status());
  Status reconciled = staging->ReconcileCatalog();
  if (!reconciled.ok()) {
    // The files are the truth; the mirror is repaired at the next ApplyReady.
    spdlog::warn("{} (retried at the next ApplyReady)", reconciled.ToString());
    staging->catalog_dirty_ = true;
  }
  return staging;
}

Status Staging::ReconcileCatalog() {
  Catalog* catalog = options_.catalog;
  if (catalog == nullptr) return Status::Ok();
  const std::string& vm = store_->vm_id();
  std::map<std::pair<uint64_t, StagedLogState>, StagedFile> files;
  VMR_RETURN_IF_ERROR(ListLogs(dir_, "", StagedLogState::kStaged, &files));
  VMR_RETURN_IF_ERROR(
      ListLogs(dir_ + "/" + kRejectedDir, std::string(kRejectedDir) + "/", StagedLogState::kRejected, &files));
  VMR_ASSIGN_OR_RETURN(std::vector<StagedLogRecord> rows, catalog->ListStagedLogs(vm));
  Status s = catalog->RunInTransaction([&]() -> Status {
    for (const StagedLogRecord& row : rows) {
      auto it = files.find({row.sequence, row.state});
      if (it == files.end()) {
        spdlog::info("staging {}: catalog row of log {} ({}) has no file, deleting the row", dir_, row.sequence,
                     row.file_name);
        VMR_RETURN_IF_ERROR(catalog->DeleteStagedLog(vm, row.sequence, row.state));
      } else if (it->second.file_name == row.file_name && it->second.size == row.size_bytes) {
        files.erase(it);  // in agreement
      }
    }
    for (const auto& [key, f] : files) {
      spdlog::info("staging {}: log file {} had no (matching) catalog row, recording it", dir_, f.file_name);
      VMR_RETURN_IF_ERROR(catalog->PutStagedLog({vm, key.first, key.second, f.file_name, f.size, f.mtime_ms}));
    }
    return Status::Ok();
  });
  return s.WithContext("staging " + dir_ + ": reconciling the catalog's staged_logs");
}

void Staging::MirrorStaged(uint64_t sequence, StagedLogState state, const std::string& file_name) {
  if (options_.catalog == nullptr) return;
  struct stat st {};
  const std::string path = dir_ + "/" + file_name;
  Status s = ::stat(path.c_str(), &st) == 0 ? Status::Ok() : Errno("stat", path);
  if (s.ok()) {
    s = options_.catalog->PutStagedLog(
        {store_->vm_id(), sequence, state, file_name, static_cast<uint64_t>(st.st_size), NowMs()});
  }
  if (!s.ok()) {
    spdlog::warn("staging {}: could not record log {} in the catalog (repaired later): {}", dir_, sequence,
                 s.ToString());
    catalog_dirty_ = true;
  }
}

void Staging::MirrorDeleted(uint64_t sequence, StagedLogState state) {
  if (options_.catalog == nullptr) return;
  Status s = options_.catalog->DeleteStagedLog(store_->vm_id(), sequence, state);
  if (!s.ok() && s.code() != Code::kNotFound) {
    spdlog::warn("staging {}: could not delete log {} from the catalog (repaired later): {}", dir_, sequence,
                 s.ToString());
    catalog_dirty_ = true;
  }
}

std::string Staging::ImportPath() const { return dir_ + "/" + kImportFile; }

Result<std::optional<std::string>> Staging::import_reservation() const {
  const std::string path = ImportPath();
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return std::optional<std::string>();
    return Errno("stat", path);
  }
  if (!S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) > kMaxImportFile)
    return Status::Corruption("import reservation " + path + ": not a regular file of at most 1024 bytes");
  VMR_ASSIGN_OR_RETURN(std::string bytes, ReadFile(path, kMaxImportFile));
  VMR_ASSIGN_OR_RETURN(std::string generation, DecodeImport(bytes, path));
  return std::optional<std::string>(std::move(generation));
}

Status Staging::ReserveImport(const std::string& generation_hex) {
  if (!IsHex32(generation_hex))
    return Status::InvalidArgument("ReserveImport: generation '" + generation_hex + "' is not 32 hex digits");
  VMR_ASSIGN_OR_RETURN(std::optional<std::string> have, import_reservation());
  if (have) {
    if (*have == generation_hex) return Status::Ok();
    return Status::FailedPrecondition("ReserveImport: staging " + dir_ +
                                      " already holds an import reservation for generation " + *have + ", not " +
                                      generation_hex);
  }
  const uint64_t latest = store_->latest_sequence();
  if (latest != 0)
    return Status::FailedPrecondition("ReserveImport: the replica store is at point " + std::to_string(latest) +
                                      "; log 1 can be reserved for an import only at point 0");
  std::error_code ec;
  for (fs::directory_iterator it(dir_, ec), end; !ec && it != end; it.increment(ec)) {
    uint64_t seq = 0;
    const std::string name = it->path().filename().string();
    if (ParseName(name, kLogSuffix, &seq) || ParseName(name, kPartSuffix, &seq))
      return Status::FailedPrecondition("ReserveImport: log " + std::to_string(seq) +
                                        " is already staged or being received in " + dir_);
  }
  if (ec) return Status::IOError("list " + dir_ + ": " + ec.message());
  nlohmann::json j = {{"version", 1}, {"sequence", 1}, {"generation", generation_hex}};
  VMR_RETURN_IF_ERROR(WriteFileAtomic(ImportPath(), j.dump() + "\n", 0600));
  spdlog::info("staging {}: log 1 reserved for an import of generation {}", dir_, generation_hex);
  return Status::Ok();
}

Status Staging::DiscardStaged() {
  if (store_->latest_sequence() != 0) {
    return Status::FailedPrecondition("staging " + dir_ + ": the store holds point " +
                                      std::to_string(store_->latest_sequence()) + "; staged logs are kept");
  }
  std::map<std::pair<uint64_t, StagedLogState>, StagedFile> files;
  VMR_RETURN_IF_ERROR(ListLogs(dir_, "", StagedLogState::kStaged, &files));
  for (const auto& [key, f] : files) {
    const std::string path = dir_ + "/" + f.file_name;
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Errno("unlink", path);
    ForgetVerified(key.first);
    MirrorDeleted(key.first, StagedLogState::kStaged);
  }
  if (!files.empty()) {
    VMR_RETURN_IF_ERROR(FsyncParentDir(dir_ + "/" + files.begin()->second.file_name));
    spdlog::info("staging {}: {} staged log(s) discarded", dir_, files.size());
  }
  return Status::Ok();
}

Status Staging::ClearImportReservation() {
  const std::string path = ImportPath();
  if (::unlink(path.c_str()) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return Errno("unlink", path);
  }
  VMR_RETURN_IF_ERROR(FsyncParentDir(path));
  spdlog::info("staging {}: import reservation removed", dir_);
  return Status::Ok();
}

Result<uint64_t> Staging::expected_sequence() const {
  uint64_t next = store_->latest_sequence() + 1;
  if (next == 1) {
    VMR_ASSIGN_OR_RETURN(std::optional<std::string> reserved, import_reservation());
    if (reserved) next = 2;  // log 1 comes by import
  }
  while (Exists(LogPath(next))) ++next;
  return next;
}

Status Staging::CheckHeader(const LogHeader& header) const {
  VMR_RETURN_IF_ERROR(ValidateLogHeader(header));
  if (header.relationship_id != store_->vm_id()) {
    return Status::InvalidArgument("log " + std::to_string(header.sequence) + " is for relationship '" +
                                   header.relationship_id + "', this replica holds '" + store_->vm_id() + "'");
  }
  const std::vector<ReplicaDisk>& disks = store_->disks();
  bool same = disks.size() == header.disks.size();
  for (size_t i = 0; same && i < disks.size(); ++i) {
    same = disks[i].name == header.disks[i].name && disks[i].size == header.disks[i].size_bytes;
  }
  if (!same) {
    return Status::InvalidArgument("log " + std::to_string(header.sequence) +
                                   ": its disk list (names, sizes, order) differs from the replica store's");
  }
  return Status::Ok();
}

Result<std::unique_ptr<LogWriter>> Staging::BeginReceive(const LogHeader& header) {
  VMR_RETURN_IF_ERROR(CheckHeader(header));
  const uint64_t seq = header.sequence;
  const uint64_t latest = store_->latest_sequence();
  VMR_ASSIGN_OR_RETURN(uint64_t expected, expected_sequence());
  if (seq <= latest) {
    return Status::FailedPrecondition("duplicate log: sequence " + std::to_string(seq) +
                                      " is already applied (latest applied " + std::to_string(latest) + "); expected " +
                                      std::to_string(expected));
  }
  if (Exists(LogPath(seq))) {
    return Status::FailedPrecondition("duplicate log: sequence " + std::to_string(seq) +
                                      " is already staged; expected " + std::to_string(expected));
  }
  if (seq == 1 && latest == 0) {
    VMR_RETURN_IF_ERROR(CheckNotReserved(seq));
  }
  if (seq != expected) {
    return Status::FailedPrecondition("out-of-sequence log: expected sequence " + std::to_string(expected) + ", got " +
                                      std::to_string(seq));
  }
  std::string part = dir_ + "/" + SeqName(seq) + kPartSuffix;
  VMR_RETURN_IF_ERROR(Unlink(part));  // an earlier, unfinished attempt
  return LogWriter::Create(part, header, options_.writer);
}

Status Staging::CommitReceived(uint64_t sequence) {
  const std::string part = dir_ + "/" + SeqName(sequence) + kPartSuffix;
  const std::string log = LogPath(sequence);
  if (!Exists(part)) return Status::NotFound("no log " + std::to_string(sequence) + " being received: " + part);
  Result<LogSummary> summary = VerifyLog(part, LogReadMode::kComplete);
  Status bad = summary.ok() ? Status::Ok() : summary.status();
  if (bad.ok() && summary->header.sequence != sequence) {
    bad = Status::Corruption("header of " + part + " names sequence " + std::to_string(summary->header.sequence));
  }
  if (bad.ok()) bad = CheckHeader(summary->header);
  if (!bad.ok()) {
    if (bad.code() == Code::kIOError) return bad;
    spdlog::warn("staging {}: received log {} refused: {}", dir_, sequence, bad.ToString());
    VMR_RETURN_IF_ERROR(Unlink(part));
    return bad.WithContext("received log " + std::to_string(sequence) + " refused and deleted, resend it");
  }
  if (Exists(log)) {
    return Status::FailedPrecondition("duplicate log: sequence " + std::to_string(sequence) + " is already staged");
  }
  if (sequence == 1 && store_->latest_sequence() == 0) {
    // A receive begun before the reservation: it must not take log 1's place.
    VMR_RETURN_IF_ERROR(CheckNotReserved(sequence));
  }
  VMR_RETURN_IF_ERROR(FsyncFile(part));
  if (::rename(part.c_str(), log.c_str()) != 0) return Errno("rename to " + log, part);
  VMR_RETURN_IF_ERROR(FsyncParentDir(log));
  // ApplyReady may apply it without another verification pass while the
  // file keeps this identity (see "Read once" in staging.h).
  if (std::optional<FileIdentity> id = IdentityOf(log)) {
    std::lock_guard<std::mutex> l(verified_mu_);
    verified_[sequence] = *id;
  }
  MirrorStaged(sequence, StagedLogState::kStaged, SeqName(sequence) + kLogSuffix);
  spdlog::info("staging {}: log {} staged ({} records)", dir_, sequence, summary->trailer.record_count);
  return Status::Ok();
}

std::optional<Staging::FileIdentity> Staging::IdentityOf(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return std::nullopt;
  FileIdentity id;
  id.dev = static_cast<uint64_t>(st.st_dev);
  id.ino = static_cast<uint64_t>(st.st_ino);
  id.size = static_cast<uint64_t>(st.st_size);
  id.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
  return id;
}

bool Staging::VerifiedHere(uint64_t sequence, const std::string& path) {
  std::optional<FileIdentity> now = IdentityOf(path);
  std::lock_guard<std::mutex> l(verified_mu_);
  auto it = verified_.find(sequence);
  return now && it != verified_.end() && it->second == *now;
}

void Staging::ForgetVerified(uint64_t sequence) {
  std::lock_guard<std::mutex> l(verified_mu_);
  verified_.erase(sequence);
}

Status Staging::CheckNotReserved(uint64_t sequence) const {
  VMR_ASSIGN_OR_RETURN(std::optional<std::string> reserved, import_reservation());
  if (!reserved) return Status::Ok();
  return Status::FailedPrecondition("log " + std::to_string(sequence) + " is reserved for ImportInitialReplica (" +
                                    ImportPath() + ", generation " + *reserved +
                                    "); it does not come over the link; expected sequence 2 or later");
}

Status Staging::Reject(const std::string& path, const Status& why) {
  const std::string rejected_dir = dir_ + "/" + kRejectedDir;
  const std::string target = rejected_dir + "/" + fs::path(path).filename().string();
  VMR_RETURN_IF_ERROR(MakeDirs(rejected_dir, 0700));
  if (::rename(path.c_str(), target.c_str()) != 0) return Errno("rename to " + target, path);
  VMR_RETURN_IF_ERROR(FsyncParentDir(target));
  VMR_RETURN_IF_ERROR(FsyncParentDir(path));
  uint64_t seq = 0;
  if (ParseName(fs::path(path).filename().string(), kLogSuffix, &seq)) {
    ForgetVerified(seq);
    MirrorStaged(seq, StagedLogState::kRejected, std::string(kRejectedDir) + "/" + SeqName(seq) + kLogSuffix);
    MirrorDeleted(seq, StagedLogState::kStaged);
  }
  spdlog::error("staging {}: staged log {} rejected: {}", dir_, path, why.ToString());
  return Status::Ok();
}

Result<uint64_t> Staging::ApplyReady(ReplicaStore& store) {
  if (&store != store_) return Status::InvalidArgument("ApplyReady: not the store this staging area was opened for");
  if (catalog_dirty_.exchange(false)) {
    Status s = ReconcileCatalog();
    if (!s.ok()) {
      spdlog::warn("{} (retried at the next ApplyReady)", s.ToString());
      catalog_dirty_ = true;
    }
  }
  // Staged logs already applied: a crash after the apply, before the unlink.
  {
    const uint64_t latest = store.latest_sequence();
    std::error_code ec;
    bool removed = false;
    for (fs::directory_iterator it(dir_, ec), end; !ec && it != end; it.increment(ec)) {
      uint64_t seq = 0;
      if (!ParseName(it->path().filename().string(), kLogSuffix, &seq) || seq > latest) continue;
      spdlog::info("staging {}: log {} is already applied (latest {}), deleting it", dir_, seq, latest);
      VMR_RETURN_IF_ERROR(Unlink(it->path().string()));
      ForgetVerified(seq);
      MirrorDeleted(seq, StagedLogState::kStaged);
      removed = true;
    }
    if (ec) return Status::IOError("list " + dir_ + ": " + ec.message());
    if (removed) VMR_RETURN_IF_ERROR(FsyncParentDir(dir_ + "/x"));
  }
  uint64_t applied = 0;
  for (;;) {
    const uint64_t seq = store.latest_sequence() + 1;
    const std::string path = LogPath(seq);
    if (!Exists(path)) break;
    // A failed check rejects the log: nothing of it applied.
    auto reject = [&](const Status& bad) -> Status {
      if (bad.code() == Code::kIOError) return bad;
      VMR_RETURN_IF_ERROR(Reject(path, bad));
      return Status::Corruption("staged log " + path + " failed verification (" + bad.ToString() +
                                "); nothing of it was applied, it was moved to " + dir_ + "/" + kRejectedDir +
                                "/ and the relationship must be resynchronised");
    };
    // The header's sequence and its match with the store.
    auto check_header = [&](const LogHeader& h) -> Status {
      if (h.sequence != seq) return Status::Corruption("header names sequence " + std::to_string(h.sequence));
      return CheckHeader(h);
    };
    // The whole file is checked before any of it is applied, unless
    // CommitReceived verified this very file in this process: then the
    // apply's reader is the check (staging.h, "Read once").
    const bool verified_here = VerifiedHere(seq, path);
    if (!verified_here) {
      Result<LogSummary> summary = VerifyLog(path, LogReadMode::kComplete);
      Status bad = summary.ok() ? check_header(summary->header) : summary.status();
      if (!bad.ok()) return reject(bad);
    }
    Result<std::unique_ptr<LogReader>> opened = LogReader::Open(path, LogReadMode::kComplete);
    if (!opened.ok()) {
      if (verified_here) return reject(opened.status().WithContext(path));  // the header rotted since
      return opened.status();
    }
    std::unique_ptr<LogReader> reader = std::move(opened).value();
    if (verified_here) {
      if (Status bad = check_header(reader->header()); !bad.ok()) return reject(bad);
    }
    PointInfo info;
    info.time_ms = static_cast<int64_t>(reader->header().cut_time_unix_ms);
    info.kind = reader->header().kind;
    info.generation_id = Hex(reader->header().new_generation);
    // The reader checks every record (checksums, bounds) before the store
    // sees it and the trailer before the store commits: a byte that rots
    // after a verification fails the reader, and the store rolls the apply
    // back: nothing of the log applied.
    Status st = store.Apply(seq, info, *reader);
    if (!st.ok()) {
      if (verified_here && store.latest_sequence() < seq) {
        // Did the log fail a check (reject it, as a verification first
        // would have) or did the store fail (leave it staged)?
        Result<LogSummary> summary = VerifyLog(path, LogReadMode::kComplete);
        if (!summary.ok() && summary.status().code() != Code::kIOError) return reject(summary.status());
      }
      return st.WithContext("applying staged log " + path);
    }
    ForgetVerified(seq);
    VMR_RETURN_IF_ERROR(Unlink(path));
    VMR_RETURN_IF_ERROR(FsyncParentDir(path));
    MirrorDeleted(seq, StagedLogState::kStaged);
    spdlog::info("staging {}: log {} applied", dir_, seq);
    ++applied;
  }
  return applied;
}

}  // namespace vmreplica
