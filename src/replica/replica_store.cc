#include "vmreplica/replica_store.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cinttypes>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <shared_mutex>
#include <unordered_map>
#include <unordered_set>

#include "replica/text_checks.h"
#include "replica/undo_format.h"
#include "vmreplica/fileutil.h"

namespace vmreplica {

using namespace replica_internal;  // NOLINT: this file implements the formats

namespace {

constexpr int64_t kHourMs = 3600 * 1000;
// Apply (group commit, docs section 5): a record is cut into pieces of at
// most this many blocks (one hole map, one disk write step each).
constexpr uint64_t kPieceBlocks = 1024;
// Before-images are read in runs of at most this many blocks (1 MiB).
constexpr uint64_t kReadRunBlocks = 256;
// Undo entries are written in chunks of about this many bytes; the batch's
// one fdatasync follows the last chunk and its marker.
constexpr size_t kUndoWriteChunk = size_t{4} << 20;
// compress_undo: data before-images stored without trying zstd after one
// that did not shrink by an eighth (docs section 4).
constexpr uint32_t kUndoZstdSkip = 7;

Status Errno(const std::string& what, const std::string& path) {
  return Status::IOError(what + " " + path + ": " + std::strerror(errno));
}

Status PreadFull(int fd, char* buf, size_t len, uint64_t off, const std::string& path) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pread(fd, buf + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("read", path);
    }
    if (n == 0) return Status::Corruption("short read of " + path + " at offset " + std::to_string(off + done));
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

Status PwriteFull(int fd, const char* buf, size_t len, uint64_t off, const std::string& path) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = ::pwrite(fd, buf + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return Errno("write", path);
    }
    done += static_cast<size_t>(n);
  }
  return Status::Ok();
}

bool IsZero(const char* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (p[i] != 0) return false;
  return true;
}

bool ValidDiskName(const std::string& n) {
  if (n.empty() || n.size() > 64 || n[0] == '.') return false;
  for (char c : n) {
    bool ok =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

Status CheckOptions(const ReplicaStoreOptions& o) {
  if (o.recovery_history_hours < 0 || o.recovery_history_hours > 24 || o.fine_window_ms < 0)
    return Status::InvalidArgument("replica store: retention options out of range");
  if (o.apply_batch_bytes < kReplicaBlockSize || o.apply_batch_bytes > kMaxApplyBatchBytes)
    return Status::InvalidArgument("replica store: apply_batch_bytes " + std::to_string(o.apply_batch_bytes) +
                                   " is not in 4096..1 GiB");
  if (o.load_sync_bytes < kMinLoadSyncBytes || o.load_sync_bytes > kMaxLoadSyncBytes)
    return Status::InvalidArgument("replica store: load_sync_bytes " + std::to_string(o.load_sync_bytes) +
                                   " is not in 1 MiB..16 GiB");
  return Status::Ok();
}

// ---- LOAD (docs section 17) ----
constexpr size_t kMaxLoadTag = 256;
// A valid LOAD is far smaller (the tag escapes to at most 512 bytes).
constexpr size_t kMaxLoadFile = 4096;

using replica_internal::IsHex32;

bool PrintableAscii(const std::string& s) {
  for (char c : s)
    if (c < 0x20 || c > 0x7e) return false;
  return true;
}

Status CheckLoadInfo(const LoadInfo& info) {
  if (info.source != "import" && info.source != "network")
    return Status::InvalidArgument("initial load: source '" + info.source + "' is not \"import\" or \"network\"");
  if (!IsHex32(info.point.generation_id))
    return Status::InvalidArgument("initial load: generation '" + info.point.generation_id +
                                   "' is not 32 hex digits");
  if (static_cast<uint16_t>(info.point.kind) > 3) return Status::InvalidArgument("initial load: bad point kind");
  if (info.tag.size() > kMaxLoadTag || !PrintableAscii(info.tag))
    return Status::InvalidArgument("initial load: the tag must be at most 256 bytes of printable ASCII");
  return Status::Ok();
}

std::string EncodeLoad(const LoadState& st) {
  nlohmann::json j = {{"version", 1},
                      {"sequence", 1},
                      {"source", st.info.source},
                      {"generation", st.info.point.generation_id},
                      {"cut_time_unix_ms", st.info.point.time_ms},
                      {"kind", static_cast<uint16_t>(st.info.point.kind)},
                      {"done_chunks", st.done_chunks},
                      {"tag", st.info.tag}};
  return j.dump() + "\n";
}

// Every field is checked; anything else is Corruption naming the file.
Result<LoadState> DecodeLoad(const std::string& bytes, const std::string& path) {
  auto bad = [&](const std::string& why) { return Status::Corruption("initial-load record " + path + ": " + why); };
  if (bytes.size() > kMaxLoadFile) return bad("larger than 4096 bytes");
  nlohmann::json j = nlohmann::json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  static const std::set<std::string> kFields = {"version", "sequence", "source", "generation",
                                                "cut_time_unix_ms", "kind", "done_chunks", "tag"};
  for (auto it = j.begin(); it != j.end(); ++it)
    if (kFields.count(it.key()) == 0) return bad("unknown field '" + it.key() + "'");
  for (const std::string& f : kFields)
    if (!j.contains(f)) return bad("field '" + f + "' is missing");
  auto unsigned_field = [&](const char* f) -> std::optional<uint64_t> {
    if (!j[f].is_number_unsigned()) return std::nullopt;
    return j[f].get<uint64_t>();
  };
  if (unsigned_field("version") != std::optional<uint64_t>(1)) return bad("version is not 1");
  if (unsigned_field("sequence") != std::optional<uint64_t>(1)) return bad("sequence is not 1");
  LoadState st;
  std::optional<uint64_t> kind = unsigned_field("kind");
  std::optional<uint64_t> done = unsigned_field("done_chunks");
  if (!kind || *kind > 3) return bad("kind is not 0..3");
  if (!done) return bad("done_chunks is not an unsigned integer");
  const nlohmann::json& t = j["cut_time_unix_ms"];
  if (!t.is_number_integer() || (t.is_number_unsigned() && t.get<uint64_t>() > uint64_t{INT64_MAX}))
    return bad("cut_time_unix_ms is not a 64-bit integer");
  if (!j["source"].is_string() || !j["generation"].is_string() || !j["tag"].is_string())
    return bad("source, generation and tag must be strings");
  st.info.source = j["source"].get<std::string>();
  st.info.tag = j["tag"].get<std::string>();
  st.info.point.generation_id = j["generation"].get<std::string>();
  st.info.point.time_ms = t.get<int64_t>();
  st.info.point.kind = static_cast<ReplicationType>(*kind);
  st.done_chunks = *done;
  Status s = CheckLoadInfo(st.info);
  if (!s.ok()) return bad(s.message());
  return st;
}

// Checks shared by Create and Adopt.
Status CheckStoreArgs(const std::string& vm_id, const std::vector<ReplicaDisk>& disks) {
  if (vm_id.empty() || vm_id.size() > kMaxString) return Status::InvalidArgument("replica store: bad VM id");
  if (disks.empty() || disks.size() > kMaxDisks) return Status::InvalidArgument("replica store: 1..256 disks needed");
  std::set<std::string> names;
  for (const ReplicaDisk& d : disks) {
    if (!ValidDiskName(d.name)) return Status::InvalidArgument("replica store: bad disk name '" + d.name + "'");
    if (!names.insert(d.name).second) return Status::InvalidArgument("replica store: disk " + d.name + " given twice");
    if (d.size == 0 || d.size % kReplicaBlockSize != 0)
      return Status::InvalidArgument("replica store: size of disk " + d.name + " must be a positive multiple of 4096");
  }
  return Status::Ok();
}

// ---- ADOPT (docs section 18) ----
// A valid ADOPT is far smaller: 256 disk names of at most 64 bytes.
constexpr size_t kMaxAdoptFile = 128 * 1024;

struct AdoptRecord {
  uint64_t sequence = 0;                // the adopted point
  std::string generation;               // its generation (32 hex digits)
  uint64_t manifest_xxh3 = 0;           // XXH3_64bits of the adopted MANIFEST's bytes
  std::vector<std::string> drop_disks;  // disk images of the old store not adopted
};

std::string EncodeAdopt(const AdoptRecord& r) {
  char hash[17];
  std::snprintf(hash, sizeof hash, "%016" PRIx64, r.manifest_xxh3);
  nlohmann::json j = {{"version", 1},
                      {"sequence", r.sequence},
                      {"generation", r.generation},
                      {"manifest_xxh3", std::string(hash)},
                      {"drop_disks", r.drop_disks}};
  return j.dump() + "\n";
}

// Every field is checked; anything else is Corruption naming the file.
Result<AdoptRecord> DecodeAdopt(const std::string& bytes, const std::string& path) {
  auto bad = [&](const std::string& why) { return Status::Corruption("adoption record " + path + ": " + why); };
  if (bytes.size() > kMaxAdoptFile) return bad("too large");
  nlohmann::json j = nlohmann::json::parse(bytes, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  static const std::set<std::string> kFields = {"version", "sequence", "generation", "manifest_xxh3", "drop_disks"};
  for (auto it = j.begin(); it != j.end(); ++it)
    if (kFields.count(it.key()) == 0) return bad("unknown field '" + it.key() + "'");
  for (const std::string& f : kFields)
    if (!j.contains(f)) return bad("field '" + f + "' is missing");
  if (!j["version"].is_number_unsigned() || j["version"].get<uint64_t>() != 1) return bad("version is not 1");
  if (!j["sequence"].is_number_unsigned() || j["sequence"].get<uint64_t>() == 0) return bad("sequence is not >= 1");
  AdoptRecord r;
  r.sequence = j["sequence"].get<uint64_t>();
  if (!j["generation"].is_string() || !IsHex32(j["generation"].get<std::string>()))
    return bad("generation is not 32 hex digits");
  r.generation = j["generation"].get<std::string>();
  const nlohmann::json& h = j["manifest_xxh3"];
  std::string hex = h.is_string() ? h.get<std::string>() : std::string();
  auto [end, err] = std::from_chars(hex.data(), hex.data() + hex.size(), r.manifest_xxh3, 16);
  if (hex.size() != 16 || err != std::errc() || end != hex.data() + hex.size())
    return bad("manifest_xxh3 is not 16 hex digits");
  const nlohmann::json& d = j["drop_disks"];
  if (!d.is_array() || d.size() > kMaxDisks) return bad("drop_disks is not an array of at most 256 names");
  std::set<std::string> seen;
  for (const nlohmann::json& n : d) {
    if (!n.is_string() || !ValidDiskName(n.get<std::string>()) || !seen.insert(n.get<std::string>()).second)
      return bad("drop_disks holds a bad or repeated disk name");
    r.drop_disks.push_back(n.get<std::string>());
  }
  return r;
}

std::string SeqName(uint64_t seq) {
  char b[32];
  std::snprintf(b, sizeof b, "%020" PRIu64, seq);
  return b;
}

std::string CatalogPointId(const std::string& vm_id, uint64_t seq) { return vm_id + "/" + SeqName(seq); }

uint64_t Key(uint32_t disk, uint64_t block) { return (uint64_t{disk} << 48) | block; }

int64_t FloorHour(int64_t t) { return (t >= 0 ? t / kHourMs : (t - kHourMs + 1) / kHourMs); }

struct Loc {
  uint64_t offset = 0;  // file offset of the entry
  bool zero = false;
};

// One undo segment: committed (its point is retained, not the latest) or the
// apply in progress.
struct Segment {
  uint64_t point_seq = 0;
  uint64_t upper_seq = 0;
  std::string path;
  int fd = -1;
  uint64_t size = 0;
  bool corrupt = false;
  std::string corrupt_message;
  std::unordered_map<uint64_t, Loc> index;

  ~Segment() {
    if (fd >= 0) ::close(fd);
  }
};

// Blocks [first, end) of one record, handled by one batch of an apply.
struct BatchPiece {
  std::shared_ptr<const DeltaRecord> rec;
  uint64_t first = 0;
  uint64_t end = 0;
};

struct ScanResult {
  bool header_ok = false;
  SegmentHeader header;
  bool complete = false;                          // a valid trailer at EOF
  std::vector<std::pair<uint64_t, Loc>> entries;  // confirmed entries (key, loc)
  uint64_t confirmed_end = 0;                     // file offset after the last confirmed record
};

}  // namespace

struct ReplicaStore::Impl {
  // Constant after construction (but opt.recovery_history_hours, which
  // SetRecoveryHistory changes under apply_mu; Retention reads it under it).
  // A SetRecoveryHistory that finds an Apply running (which may wait for
  // its records for long: an apply while receiving) leaves the value here;
  // the next Retention (under apply_mu) takes it. -1: none.
  std::atomic<int> pending_history{-1};
  std::string dir;
  Catalog* catalog = nullptr;
  ReplicaStoreOptions opt;
  std::optional<FileLock> lock;
  std::vector<uint64_t> disk_blocks;  // blocks per disk
  std::string vm_id;                  // == manifest.vm_id (never changes)
  std::vector<ReplicaDisk> disks;     // == manifest.disks (never change)

  std::mutex apply_mu;  // serialises Apply / ApplyRetention
  // Held by Retention for its whole run and by PinPoint / UnpinPoint, so a
  // point cannot be pinned between retention's choice and its drop. Lock
  // order: apply_mu, pins_mu, turnstile/mu.
  std::mutex pins_mu;
  std::map<uint64_t, int> pins;  // guarded by pins_mu: sequence -> pin count
  uint64_t hook_n = 0;  // guarded by apply_mu (hooks only run in writers)
  bool broken = false;  // guarded by apply_mu

  mutable std::shared_mutex mu;  // readers shared; writers exclusive per step
  // Writer preference: a writer holds the turnstile while it waits for mu,
  // so new readers queue behind it (glibc's rwlock prefers readers).
  mutable std::mutex turnstile;
  std::shared_lock<std::shared_mutex> ReadLock() const {
    { std::lock_guard t(turnstile); }
    return std::shared_lock(mu);
  }
  std::unique_lock<std::shared_mutex> WriteLock() const {
    std::lock_guard t(turnstile);
    return std::unique_lock(mu);
  }
  Manifest manifest;                                      // guarded by mu
  std::vector<int> disk_fds;                              // fds constant; content guarded by mu
  std::map<uint64_t, std::unique_ptr<Segment>> segments;  // guarded by mu; by point_seq
  std::unique_ptr<Segment> inflight;                      // guarded by mu
  // The initial load in progress (docs section 17); done_chunks is what
  // LOAD says. Guarded by mu; changed only with apply_mu held too, so the
  // load calls and Apply read it under apply_mu alone.
  std::optional<LoadState> load;
  uint64_t load_written = 0;   // guarded by apply_mu: chunks written by this process (or durable at Open)
  uint64_t load_unsynced = 0;  // guarded by apply_mu: data bytes written since the last sync

  ~Impl() {
    for (int fd : disk_fds)
      if (fd >= 0) ::close(fd);
  }

  std::string ManifestPath() const { return dir + "/MANIFEST"; }
  std::string LoadPath() const { return dir + "/LOAD"; }
  std::string AdoptPath() const { return dir + "/ADOPT"; }
  std::string DiskPath(uint32_t d) const { return dir + "/disks/" + disks[d].name + ".img"; }
  std::string UndoDir() const { return dir + "/undo"; }
  std::string SegmentPath(uint64_t seq) const { return UndoDir() + "/" + SeqName(seq) + ".vru"; }
  uint32_t bs() const { return manifest.block_size; }
  int64_t Now() const {
    if (opt.now_ms) return opt.now_ms();
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
  }

  void Hook(const std::string& step) {
    if (opt.crash_hook) opt.crash_hook(step, ++hook_n);
  }
  // Runs `op` between the before/after hooks of `step`.
  template <typename F>
  Status Step(const std::string& step, F&& op) {
    Hook(step + ":before");
    Status s = op();
    Hook(step + ":after");
    return s;
  }

  // Unlinks `path` (already gone is fine) between the hooks of `step`.
  Status UnlinkStep(const std::string& step, const std::string& path) {
    return Step(step, [&] {
      return ::unlink(path.c_str()) == 0 || errno == ENOENT ? Status::Ok() : Errno("unlink", path);
    });
  }
  Status FsyncFd(int fd, const std::string& step, const std::string& path) {
    return Step(step, [&] { return ::fsync(fd) == 0 ? Status::Ok() : Errno("fsync", path); });
  }
  Status FsyncDir(const std::string& dir_path, const std::string& step) {
    return Step(step, [&] { return FsyncParentDir(dir_path + "/."); });
  }
  Status WriteManifest(const Manifest& m) {
    return Step("manifest.write", [&] { return WriteFileAtomic(ManifestPath(), EncodeManifest(m)); });
  }
  // The MANIFEST of FinishLoad and Adopt (docs sections 17, 18): this store
  // with point `seq` alone and no carried segment.
  Manifest OnlyPoint(uint64_t seq, const PointInfo& p) const {
    Manifest next = manifest;
    next.points = {ManifestPoint{seq, p.time_ms, static_cast<uint16_t>(p.kind), p.generation_id}};
    next.carried.clear();
    return next;
  }
  // Their commit: `next` renamed into place, then installed, with `also`
  // run under the same write lock. A failed write may or may not have
  // reached the disk: the store refuses changes (only Open can tell).
  Status CommitOnlyPoint(Manifest next, const std::function<void()>& also) {
    Status s = WriteManifest(next);
    if (!s.ok()) {
      broken = true;
      return s;
    }
    auto lk = WriteLock();
    manifest = std::move(next);
    if (also) also();
    return Status::Ok();
  }

  Status OpenDisks();
  // Initial load (docs section 17); apply_mu held for all but RecoverLoad.
  Status WriteLoad(const LoadState& st) {
    return Step("load.write", [&] { return WriteFileAtomic(LoadPath(), EncodeLoad(st), 0600); });
  }
  Status UnlinkLoad() {
    const std::string path = LoadPath();
    VMR_RETURN_IF_ERROR(Step("load.unlink", [&] {
      return ::unlink(path.c_str()) == 0 || errno == ENOENT ? Status::Ok() : Errno("unlink", path);
    }));
    return FsyncDir(dir, "load.dir.fsync");
  }
  Status CheckLoadCall(const char* call) const;
  Status SyncLoadLocked();
  Status RecoverLoad();  // at Open, after Recover
  // Adoption (docs section 18). An ADOPT record found by Open (before
  // Recover) or by Adopt: finishes a committed adoption's cleanup or
  // forgets one that did not commit. `manifest_bytes`: MANIFEST, if any.
  Status RecoverAdopt(const std::optional<std::string>& manifest_bytes);
  // After an adoption's commit: every undo file, the old-only disk images,
  // then ADOPT itself.
  Status FinishAdopt(const std::vector<std::string>& drop_disks);
  Result<ScanResult> ScanSegment(int fd, const std::string& path, bool committed);
  Status RestoreFromScan(int fd, const std::string& path, const ScanResult& scan);
  Status RollbackInflightLocked();
  Status Recover();
  Status ReadBlockFromSegment(const Segment& seg, const Loc& loc, uint32_t disk, uint64_t block, char* out) const;
  Status WriteZeros(uint32_t disk, uint64_t off, uint64_t len);
  Status ValidateRecord(const DeltaRecord& rec) const;
  // is_data[k] = block first+k of `disk` holds allocated bytes (SEEK_DATA /
  // SEEK_HOLE; when the file system cannot tell, every block counts as data).
  void DataMap(uint32_t disk, uint64_t first, uint64_t end, std::vector<char>* is_data) const;
  // One batch of an apply (docs section 5): Save each piece as it joins
  // the batch (its before-images), then SealAndWrite once (one fdatasync,
  // then the data). Lives on the applying thread, apply_mu held.
  struct UndoBatch {
    explicit UndoBatch(Impl& store);
    Status Save(const BatchPiece& p);
    Status SealAndWrite(const std::vector<BatchPiece>& pieces);

   private:
    Status Flush();  // the entries not yet written, at buf_at
    Impl& m;
    std::vector<std::pair<uint64_t, Loc>> added;  // entries of this batch, published by SealAndWrite
    std::unordered_set<uint64_t> pending;         // their keys
    std::string buf;                              // entries not yet written; flushed every kUndoWriteChunk
    uint64_t buf_at;                              // file offset of buf[0]
    std::string run;
    std::string zblock;
    std::vector<char> is_data;
    uint32_t skip_zstd = 0;  // before-images still to store without trying zstd (docs section 4)
  };
  Status SyncCatalog();
  Status Retention();
  Status DropPoint(size_t i);
  std::vector<const Segment*> SegmentsFor(uint64_t seq) const;  // mu held
  Status CheckReadable(uint64_t seq, uint32_t disk) const;      // mu held
};

ReplicaStore::ReplicaStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ReplicaStore::~ReplicaStore() = default;

// ---- Opening -----------------------------------------------------------------

Status ReplicaStore::Impl::OpenDisks() {
  disk_blocks.clear();
  for (uint32_t d = 0; d < disks.size(); ++d) {
    std::string p = DiskPath(d);
    int fd = ::open(p.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return Errno("open disk image", p);
    disk_fds.push_back(fd);
    struct stat st {};
    if (::fstat(fd, &st) != 0) return Errno("stat", p);
    if (static_cast<uint64_t>(st.st_size) != disks[d].size)
      return Status::Corruption("disk image " + p + " has size " + std::to_string(st.st_size) + ", MANIFEST says " +
                                std::to_string(disks[d].size));
    disk_blocks.push_back(disks[d].size / bs());
  }
  return Status::Ok();
}

Result<std::unique_ptr<ReplicaStore>> ReplicaStore::Create(const std::string& dir, const std::string& vm_id,
                                                           const std::vector<ReplicaDisk>& disks, Catalog* catalog,
                                                           ReplicaStoreOptions options) {
  VMR_RETURN_IF_ERROR(CheckStoreArgs(vm_id, disks));
  VMR_RETURN_IF_ERROR(CheckOptions(options));
  VMR_RETURN_IF_ERROR(MakeDirs(dir + "/disks"));
  VMR_RETURN_IF_ERROR(MakeDirs(dir + "/undo"));
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->catalog = catalog;
  impl->opt = std::move(options);
  VMR_ASSIGN_OR_RETURN(FileLock lock, FileLock::Acquire(dir + "/LOCK"));
  impl->lock.emplace(std::move(lock));
  if (::access(impl->ManifestPath().c_str(), F_OK) == 0)
    return Status::AlreadyExists("replica store already exists in " + dir);
  // Leftovers of an earlier Create that did not reach its MANIFEST.
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(impl->UndoDir(), ec)) std::filesystem::remove(e.path(), ec);
  std::filesystem::remove(impl->LoadPath(), ec);
  std::filesystem::remove(impl->AdoptPath(), ec);  // an adoption that never committed
  impl->manifest.vm_id = impl->vm_id = vm_id;
  impl->manifest.disks = impl->disks = disks;
  impl->manifest.points.push_back(ManifestPoint{0, impl->Now(), 0, ""});
  for (uint32_t d = 0; d < disks.size(); ++d) {
    std::string p = impl->DiskPath(d);
    int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return Errno("create disk image", p);
    impl->disk_fds.push_back(fd);
    if (::ftruncate(fd, static_cast<off_t>(disks[d].size)) != 0) return Errno("size disk image", p);
    VMR_RETURN_IF_ERROR(impl->FsyncFd(fd, "disk.fsync", p));
    impl->disk_blocks.push_back(disks[d].size / kReplicaBlockSize);
  }
  VMR_RETURN_IF_ERROR(impl->FsyncDir(dir + "/disks", "disks.dir.fsync"));
  VMR_RETURN_IF_ERROR(impl->WriteManifest(impl->manifest));
  impl->SyncCatalog().IgnoreError();  // logged inside; reconciled at the next apply/open
  spdlog::info("replica store {}: created for VM {} with {} disk(s)", dir, vm_id, disks.size());
  return std::unique_ptr<ReplicaStore>(new ReplicaStore(std::move(impl)));
}

Result<std::unique_ptr<ReplicaStore>> ReplicaStore::Open(const std::string& dir, Catalog* catalog,
                                                         ReplicaStoreOptions options) {
  VMR_RETURN_IF_ERROR(CheckOptions(options));
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->catalog = catalog;
  impl->opt = std::move(options);
  if (::access((dir + "/MANIFEST").c_str(), F_OK) != 0) return Status::NotFound("no replica store in " + dir);
  VMR_ASSIGN_OR_RETURN(FileLock lock, FileLock::Acquire(dir + "/LOCK"));
  impl->lock.emplace(std::move(lock));
  VMR_ASSIGN_OR_RETURN(std::string bytes, ReadFile(impl->ManifestPath()));
  VMR_RETURN_IF_ERROR(impl->RecoverAdopt(bytes));  // before Recover: ADOPT's orphans are never rolled back
  VMR_ASSIGN_OR_RETURN(impl->manifest, DecodeManifest(bytes));
  std::set<std::string> names;
  for (const ReplicaDisk& d : impl->manifest.disks)
    if (!ValidDiskName(d.name) || !names.insert(d.name).second)
      return Status::Corruption("replica MANIFEST: bad or repeated disk name");
  impl->vm_id = impl->manifest.vm_id;
  impl->disks = impl->manifest.disks;
  VMR_RETURN_IF_ERROR(impl->OpenDisks());
  VMR_RETURN_IF_ERROR(impl->Recover());
  VMR_RETURN_IF_ERROR(impl->RecoverLoad());
  return std::unique_ptr<ReplicaStore>(new ReplicaStore(std::move(impl)));
}

// ---- Segment scanning and rollback ---------------------------------------------

Result<ScanResult> ReplicaStore::Impl::ScanSegment(int fd, const std::string& path, bool committed) {
  ScanResult r;
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Errno("stat", path);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  auto corrupt = [&](const std::string& m) { return Status::Corruption("undo segment " + path + ": " + m); };
  if (size < kSegmentHeaderSize) {
    if (committed) return corrupt("shorter than its header");
    return r;  // torn header of an apply that wrote nothing yet
  }
  char hb[kSegmentHeaderSize];
  VMR_RETURN_IF_ERROR(PreadFull(fd, hb, sizeof hb, 0, path));
  Status hs = DecodeSegmentHeader(hb, &r.header);
  if (!hs.ok()) {
    if (committed) return hs.WithContext(path);
    return r;  // header never became durable: no data was written after it
  }
  if (r.header.disk_count != disks.size()) return corrupt("disk count differs from MANIFEST");
  r.header_ok = true;
  uint64_t pos = kSegmentHeaderSize;
  r.confirmed_end = pos;
  std::vector<std::pair<uint64_t, Loc>> pending;
  std::unordered_set<uint64_t> seen;
  std::string buf(kRecordHeaderSize + bs(), '\0');
  std::string problem;
  while (pos < size) {
    if (size - pos < kRecordHeaderSize) {
      problem = "truncated record";
      break;
    }
    size_t want = static_cast<size_t>(std::min<uint64_t>(buf.size(), size - pos));
    VMR_RETURN_IF_ERROR(PreadFull(fd, buf.data(), want, pos, path));
    RecordHeader h = ParseRecordHeader(buf.data());
    if (h.tag == kEntryTag) {
      bool zero = (h.flags & kEntryFlagZero) != 0;
      if (!EntryShapeOk(h.flags, h.payload_len, bs()) || h.disk >= disks.size() ||
          h.block >= disk_blocks[h.disk] || size - pos < kRecordHeaderSize + h.payload_len ||
          !EntryChecksumOk(buf.data(), buf.data() + kRecordHeaderSize, h.payload_len)) {
        problem = "bad entry";
        break;
      }
      uint64_t key = Key(h.disk, h.block);
      if (!seen.insert(key).second) return corrupt("block listed twice at offset " + std::to_string(pos));
      pending.push_back({key, Loc{pos, zero}});
      pos += kRecordHeaderSize + h.payload_len;
    } else if (h.tag == kBatchTag || h.tag == kTrailerTag) {
      if (!MarkerChecksumOk(buf.data()) || h.offset != pos || h.entry_count != r.entries.size() + pending.size()) {
        problem = "bad marker";
        break;
      }
      r.entries.insert(r.entries.end(), pending.begin(), pending.end());
      pending.clear();
      pos += kRecordHeaderSize;
      r.confirmed_end = pos;
      if (h.tag == kTrailerTag) {
        if (pos != size) {
          problem = "bytes after the trailer";
          break;
        }
        r.complete = true;
      }
    } else {
      problem = "unknown record tag";
      break;
    }
  }
  if (committed) {
    if (!problem.empty()) return corrupt(problem + " at offset " + std::to_string(pos));
    if (!r.complete) return corrupt("no trailer");
    return r;
  }
  if (problem.empty()) return r;
  // An apply in progress: the tail after the last marker may be torn. If a
  // valid marker exists further on, the bad record is in the middle: that
  // is corruption, not a torn write.
  constexpr uint64_t kChunk = 1 << 20;
  std::string chunk;
  for (uint64_t base = pos + 1; base + kRecordHeaderSize <= size; base += kChunk) {
    // Each chunk overlaps the next by a record header minus one byte.
    uint64_t n = std::min<uint64_t>(kChunk + kRecordHeaderSize - 1, size - base);
    chunk.resize(static_cast<size_t>(n));
    VMR_RETURN_IF_ERROR(PreadFull(fd, chunk.data(), chunk.size(), base, path));
    for (uint64_t i = 0; i < kChunk && i + kRecordHeaderSize <= n; ++i) {
      const char* m = chunk.data() + i;
      RecordHeader h = ParseRecordHeader(m);
      if ((h.tag == kBatchTag || h.tag == kTrailerTag) && h.offset == base + i && MarkerChecksumOk(m))
        return corrupt(problem + " at offset " + std::to_string(pos) + " before a valid marker at " +
                       std::to_string(base + i));
    }
  }
  spdlog::warn("undo segment {}: torn tail at offset {} ({}), ignored", path, pos, problem);
  return r;
}

Status ReplicaStore::Impl::ReadBlockFromSegment(const Segment& seg, const Loc& loc, uint32_t disk, uint64_t block,
                                                char* out) const {
  std::string buf(kRecordHeaderSize + bs(), '\0');
  // A compressed entry is shorter than a plain one: read what the file has.
  if (loc.offset + kRecordHeaderSize > seg.size)
    return Status::Corruption("undo segment " + seg.path + ": entry beyond its end");
  size_t want = loc.zero ? kRecordHeaderSize : static_cast<size_t>(std::min<uint64_t>(buf.size(), seg.size - loc.offset));
  VMR_RETURN_IF_ERROR(PreadFull(seg.fd, buf.data(), want, loc.offset, seg.path));
  RecordHeader h = ParseRecordHeader(buf.data());
  bool zero = (h.flags & kEntryFlagZero) != 0;
  if (h.tag != kEntryTag || h.disk != disk || h.block != block || zero != loc.zero ||
      !EntryShapeOk(h.flags, h.payload_len, bs()) || kRecordHeaderSize + h.payload_len > want ||
      !EntryChecksumOk(buf.data(), buf.data() + kRecordHeaderSize, h.payload_len))
    return Status::Corruption("undo segment " + seg.path + ": entry at offset " + std::to_string(loc.offset) +
                              " fails its checks");
  if (zero) {
    std::memset(out, 0, bs());
  } else if (h.flags == kEntryFlagZstd) {
    // One context per thread: readers run concurrently.
    thread_local std::unique_ptr<ZSTD_DCtx, size_t (*)(ZSTD_DCtx*)> dctx(ZSTD_createDCtx(), ZSTD_freeDCtx);
    if (!dctx) return Status::Internal("zstd: cannot create a decompression context");
    size_t n = ZSTD_decompressDCtx(dctx.get(), out, bs(), buf.data() + kRecordHeaderSize, h.payload_len);
    if (ZSTD_isError(n) || n != bs())
      return Status::Corruption("undo segment " + seg.path + ": compressed entry at offset " +
                                std::to_string(loc.offset) + " does not decompress to one block");
  } else {
    std::memcpy(out, buf.data() + kRecordHeaderSize, bs());
  }
  return Status::Ok();
}

Status ReplicaStore::Impl::WriteZeros(uint32_t disk, uint64_t off, uint64_t len) {
  int fd = disk_fds[disk];
  if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off), static_cast<off_t>(len)) ==
      0)
    return Status::Ok();
  if (errno != EOPNOTSUPP && errno != ENOSYS) return Errno("punch hole in", DiskPath(disk));
  std::string zeros(static_cast<size_t>(std::min<uint64_t>(len, 1 << 20)), '\0');
  for (uint64_t done = 0; done < len;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(zeros.size(), len - done));
    VMR_RETURN_IF_ERROR(PwriteFull(fd, zeros.data(), n, off + done, DiskPath(disk)));
    done += n;
  }
  return Status::Ok();
}

Status ReplicaStore::Impl::RestoreFromScan(int fd, const std::string& path, const ScanResult& scan) {
  if (scan.entries.empty()) return Status::Ok();
  Segment tmp;
  tmp.path = path;
  tmp.fd = ::dup(fd);
  if (tmp.fd < 0) return Errno("dup", path);
  struct stat st {};
  if (::fstat(fd, &st) != 0) return Errno("stat", path);
  tmp.size = static_cast<uint64_t>(st.st_size);
  std::string block(bs(), '\0');
  for (const auto& [key, loc] : scan.entries) {
    uint32_t disk = static_cast<uint32_t>(key >> 48);
    uint64_t b = key & ((uint64_t{1} << 48) - 1);
    VMR_RETURN_IF_ERROR(ReadBlockFromSegment(tmp, loc, disk, b, block.data()));
    Status s = Step("rollback.write", [&] {
      if (loc.zero) return WriteZeros(disk, b * bs(), bs());
      return PwriteFull(disk_fds[disk], block.data(), bs(), b * bs(), DiskPath(disk));
    });
    VMR_RETURN_IF_ERROR(s);
  }
  for (uint32_t d = 0; d < disk_fds.size(); ++d)
    VMR_RETURN_IF_ERROR(FsyncFd(disk_fds[d], "rollback.disk.fsync", DiskPath(d)));
  return Status::Ok();
}

// Rolls the apply in progress back (mu held exclusively) and removes its
// segment. On error the segment stays for the next Open.
Status ReplicaStore::Impl::RollbackInflightLocked() {
  if (!inflight) return Status::Ok();
  VMR_ASSIGN_OR_RETURN(ScanResult scan, ScanSegment(inflight->fd, inflight->path, false));
  VMR_RETURN_IF_ERROR(RestoreFromScan(inflight->fd, inflight->path, scan));
  std::string path = inflight->path;
  inflight.reset();
  VMR_RETURN_IF_ERROR(Step("undo.unlink", [&] {
    return ::unlink(path.c_str()) == 0 || errno == ENOENT ? Status::Ok() : Errno("unlink", path);
  }));
  return FsyncDir(UndoDir(), "undo.dir.fsync");
}

Status ReplicaStore::Impl::Recover() {
  auto lk = WriteLock();
  const uint64_t latest = manifest.points.back().sequence;
  // Every committed segment: the non-latest points' and the carried ones.
  std::set<uint64_t> retained(manifest.carried.begin(), manifest.carried.end());
  for (size_t i = 0; i + 1 < manifest.points.size(); ++i) retained.insert(manifest.points[i].sequence);
  std::error_code ec;
  std::vector<std::pair<uint64_t, std::string>> files;
  for (const auto& e : std::filesystem::directory_iterator(UndoDir(), ec)) {
    std::string name = e.path().filename().string();
    if (name.size() > 4 && name.ends_with(".tmp")) {
      spdlog::info("replica store {}: removing unfinished merge {}", dir, name);
      std::filesystem::remove(e.path(), ec);
      continue;
    }
    uint64_t seq = 0;
    auto [end, err] = std::from_chars(name.data(), name.data() + std::min<size_t>(name.size(), 20), seq);
    if (name.size() != 24 || !name.ends_with(".vru") || err != std::errc() || end != name.data() + 20) {
      spdlog::warn("replica store {}: ignoring unknown file undo/{}", dir, name);
      continue;
    }
    files.push_back({seq, e.path().string()});
  }
  if (ec) return Status::IOError("list " + UndoDir() + ": " + ec.message());
  bool unlinked = false;
  for (const auto& [seq, path] : files) {
    if (seq == latest) {
      // An apply that did not commit: roll it back.
      int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) return Errno("open", path);
      auto scan = ScanSegment(fd, path, false);
      Status s = scan.ok() ? Status::Ok() : scan.status();
      if (s.ok() && scan->header_ok && (scan->header.point_seq != latest || scan->header.upper_seq != latest + 1))
        s = Status::Corruption("undo segment " + path + ": header names the wrong points");
      if (s.ok()) s = RestoreFromScan(fd, path, *scan);
      ::close(fd);
      VMR_RETURN_IF_ERROR(s.WithContext("replica store " + dir + ": rolling back an unfinished apply"));
      spdlog::info("replica store {}: rolled back unfinished apply of delta {} ({} block(s))", dir, latest + 1,
                   scan->entries.size());
      if (::unlink(path.c_str()) != 0) return Errno("unlink", path);
      unlinked = true;
    } else if (retained.count(seq) == 0) {
      spdlog::info("replica store {}: removing orphan undo segment {}", dir, path);
      if (::unlink(path.c_str()) != 0) return Errno("unlink", path);
      unlinked = true;
    } else {
      auto seg = std::make_unique<Segment>();
      seg->point_seq = seq;
      seg->path = path;
      seg->fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (seg->fd < 0) return Errno("open", path);
      struct stat st {};
      if (::fstat(seg->fd, &st) != 0) return Errno("stat", path);
      seg->size = static_cast<uint64_t>(st.st_size);
      auto scan = ScanSegment(seg->fd, path, true);
      if (scan.ok() && scan->header.point_seq != seq)
        scan = Status::Corruption("undo segment " + path + ": header names point " +
                                  std::to_string(scan->header.point_seq));
      if (!scan.ok()) {
        if (scan.status().code() != Code::kCorruption) return scan.status();
        spdlog::error("replica store {}: {}", dir, scan.status().ToString());
        seg->corrupt = true;
        seg->corrupt_message = scan.status().message();
      } else {
        seg->upper_seq = scan->header.upper_seq;
        for (const auto& [k, loc] : scan->entries) seg->index.emplace(k, loc);
      }
      segments[seq] = std::move(seg);
    }
  }
  if (unlinked) VMR_RETURN_IF_ERROR(FsyncDir(UndoDir(), "undo.dir.fsync"));
  // Every committed segment must be there and apply on top of the next one
  // in the chain (the latest point last). A segment whose upper_seq names a
  // later entry of the chain is a version-1 merge that reached its rename:
  // it is rolled forward (the entries in between are dropped).
  std::vector<uint64_t> chain(retained.begin(), retained.end());
  chain.push_back(latest);
  bool changed = false;
  for (size_t i = 0; i + 1 < chain.size(); ++i) {
    uint64_t seq = chain[i];
    auto it = segments.find(seq);
    if (it == segments.end()) {
      auto seg = std::make_unique<Segment>();
      seg->point_seq = seq;
      seg->path = SegmentPath(seq);
      seg->corrupt = true;
      seg->corrupt_message = "undo segment " + seg->path + " is missing";
      spdlog::error("replica store {}: {}", dir, seg->corrupt_message);
      segments[seq] = std::move(seg);
      continue;
    }
    Segment& seg = *it->second;
    if (seg.corrupt || seg.upper_seq == chain[i + 1]) continue;
    size_t j = i + 1;
    while (j < chain.size() && chain[j] < seg.upper_seq) ++j;
    if (j == chain.size() || chain[j] != seg.upper_seq) {
      seg.corrupt = true;
      seg.corrupt_message =
          "undo segment " + seg.path + " applies on top of unknown point " + std::to_string(seg.upper_seq);
      continue;
    }
    spdlog::info("replica store {}: finishing merge of {}..{} into {}", dir, chain[i + 1], chain[j - 1], seq);
    std::set<uint64_t> gone(chain.begin() + static_cast<long>(i + 1), chain.begin() + static_cast<long>(j));
    for (uint64_t g : gone) segments.erase(g);
    std::erase_if(manifest.points, [&](const ManifestPoint& p) { return gone.count(p.sequence) > 0; });
    std::erase_if(manifest.carried, [&](uint64_t c) { return gone.count(c) > 0; });
    chain.erase(chain.begin() + static_cast<long>(i + 1), chain.begin() + static_cast<long>(j));
    changed = true;
  }
  if (changed) {
    VMR_RETURN_IF_ERROR(WriteManifest(manifest));
    for (const auto& [seq, path] : files) {
      bool live = segments.count(seq) != 0;
      if (!live && seq != latest && ::access(path.c_str(), F_OK) == 0 && ::unlink(path.c_str()) != 0)
        return Errno("unlink", path);
    }
    VMR_RETURN_IF_ERROR(FsyncDir(UndoDir(), "undo.dir.fsync"));
  }
  lk.unlock();
  SyncCatalog().IgnoreError();  // logged inside; retried later
  return Status::Ok();
}

// ---- Apply -------------------------------------------------------------------

Status ReplicaStore::Impl::ValidateRecord(const DeltaRecord& rec) const {
  if (rec.disk >= disks.size())
    return Status::InvalidArgument("delta record names disk " + std::to_string(rec.disk) + " of " +
                                   std::to_string(disks.size()));
  const uint64_t disk_size = disks[rec.disk].size;
  if (rec.length == 0 || rec.offset > disk_size || rec.length > disk_size - rec.offset)
    return Status::InvalidArgument("delta record [" + std::to_string(rec.offset) + ", +" + std::to_string(rec.length) +
                                   ") is outside disk " + disks[rec.disk].name);
  if (rec.zero ? !rec.data.empty() : rec.data.size() != rec.length)
    return Status::InvalidArgument("delta record payload has " + std::to_string(rec.data.size()) +
                                   " bytes for length " + std::to_string(rec.length));
  return Status::Ok();
}

void ReplicaStore::Impl::DataMap(uint32_t disk, uint64_t first, uint64_t end, std::vector<char>* is_data) const {
  const uint64_t b = bs();
  is_data->assign(static_cast<size_t>(end - first), 0);
  const int fd = disk_fds[disk];
  uint64_t pos = first * b;
  while (pos < end * b) {
    off_t d = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (d < 0) {
      if (errno == ENXIO) return;  // only holes from pos on
      break;                       // cannot tell: treat the rest as data
    }
    if (static_cast<uint64_t>(d) >= end * b) return;
    off_t h = ::lseek(fd, d, SEEK_HOLE);
    if (h < 0) {
      pos = static_cast<uint64_t>(d);
      break;
    }
    // A block with any allocated byte counts as data.
    uint64_t from = static_cast<uint64_t>(d) / b;
    uint64_t to = std::min<uint64_t>(end, (static_cast<uint64_t>(h) + b - 1) / b);
    for (uint64_t k = std::max(from, first); k < to; ++k) (*is_data)[k - first] = 1;
    pos = to * b;
  }
  for (uint64_t k = std::max(first, pos / b); k < end; ++k) (*is_data)[k - first] = 1;
}

ReplicaStore::Impl::UndoBatch::UndoBatch(Impl& store) : m(store), buf_at(store.inflight->size) {}

// Step a of section 5 for one piece, done as soon as the piece is in the
// batch (while the source still receives the next records): the
// before-images of its blocks that the segment does not hold yet, read from
// the images as they are at the previous point (no data of this batch is
// written before Seal, and blocks written by earlier batches are in the
// index). Only the applying thread changes the images and the in-flight
// index (apply_mu), so none of this needs mu: readers go on reading the
// previous point from the same bytes.
Status ReplicaStore::Impl::UndoBatch::Save(const BatchPiece& p) {
  const uint32_t b = m.bs();
  auto add_entry = [&](uint32_t disk, uint64_t blk, const char* block, bool zero) -> Status {
    const uint64_t key = Key(disk, blk);
    pending.insert(key);
    added.push_back({key, Loc{buf_at + buf.size(), zero}});
    size_t zlen = 0;
    if (!zero && m.opt.compress_undo && skip_zstd > 0) {
      --skip_zstd;
    } else if (!zero && m.opt.compress_undo) {
      // Kept compressed only when that saves at least an eighth. A block
      // that does not is followed by kUndoZstdSkip blocks stored as they
      // are: runs of incompressible data (encrypted or compressed files)
      // cost one try in kUndoZstdSkip + 1.
      thread_local std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> cctx(ZSTD_createCCtx(), ZSTD_freeCCtx);
      zblock.resize(ZSTD_compressBound(b));
      if (cctx) zlen = ZSTD_compressCCtx(cctx.get(), zblock.data(), zblock.size(), block, b, 1);
      if (!cctx || ZSTD_isError(zlen) || zlen > b - b / 8) {
        zlen = 0;
        skip_zstd = kUndoZstdSkip;
      }
    }
    if (zlen > 0) {
      AppendRawEntry(&buf, disk, blk, kEntryFlagZstd, zblock.data(), static_cast<uint32_t>(zlen));
    } else {
      AppendEntry(&buf, disk, blk, zero, block, b);
    }
    return buf.size() >= kUndoWriteChunk ? Flush() : Status::Ok();
  };
  auto saved = [&](uint32_t disk, uint64_t blk) {
    const uint64_t key = Key(disk, blk);
    return m.inflight->index.count(key) != 0 || pending.count(key) != 0;
  };
  const DeltaRecord& rec = *p.rec;
  m.DataMap(rec.disk, p.first, p.end, &is_data);
  uint64_t blk = p.first;
  while (blk < p.end) {
    if (saved(rec.disk, blk)) {
      ++blk;
      continue;
    }
    if (is_data[blk - p.first] == 0) {
      // A hole: zeroing it changes nothing (no entry at all); anything
      // else saves a zero entry (32 bytes, no payload, no read).
      if (!rec.zero) VMR_RETURN_IF_ERROR(add_entry(rec.disk, blk, nullptr, true));
      ++blk;
      continue;
    }
    // A run of allocated blocks to save: one read.
    uint64_t r = blk + 1;
    while (r < p.end && r - blk < kReadRunBlocks && is_data[r - p.first] != 0 && !saved(rec.disk, r)) ++r;
    run.resize(static_cast<size_t>((r - blk) * b));
    VMR_RETURN_IF_ERROR(PreadFull(m.disk_fds[rec.disk], run.data(), run.size(), blk * b, m.DiskPath(rec.disk)));
    for (uint64_t x = blk; x < r; ++x) {
      const char* block = run.data() + (x - blk) * b;
      VMR_RETURN_IF_ERROR(add_entry(rec.disk, x, block, IsZero(block, b)));
    }
    blk = r;
  }
  return Status::Ok();
}

Status ReplicaStore::Impl::UndoBatch::Flush() {
  if (buf.empty()) return Status::Ok();
  VMR_RETURN_IF_ERROR(
      m.Step("undo.write", [&] { return PwriteFull(m.inflight->fd, buf.data(), buf.size(), buf_at, m.inflight->path); }));
  buf_at += buf.size();
  buf.clear();
  return Status::Ok();
}

// Steps b and c: one marker and one fdatasync for the whole batch, after
// which readers may use the entries; then the data. Every block the data
// changes has a durable before-image that readers already use, so the
// writes need no lock and no fsync of their own: the disks are fsynced
// once, before the trailer (docs section 5).
Status ReplicaStore::Impl::UndoBatch::SealAndWrite(const std::vector<BatchPiece>& pieces) {
  const uint32_t b = m.bs();
  if (!added.empty()) {
    AppendMarker(&buf, kBatchTag, buf_at + buf.size(), m.inflight->index.size() + added.size());
    VMR_RETURN_IF_ERROR(Flush());
    VMR_RETURN_IF_ERROR(m.Step("undo.fsync", [&] {
      return ::fdatasync(m.inflight->fd) == 0 ? Status::Ok() : Errno("fdatasync", m.inflight->path);
    }));
    auto lk = m.WriteLock();
    m.inflight->size = buf_at;
    for (const auto& [k, loc] : added) m.inflight->index.emplace(k, loc);
  }
  for (const BatchPiece& p : pieces) {
    const DeltaRecord& rec = *p.rec;
    const uint64_t lo = std::max(rec.offset, p.first * b);
    const uint64_t hi = std::min(rec.offset + rec.length, p.end * b);
    VMR_RETURN_IF_ERROR(m.Step("disk.write", [&] {
      if (rec.zero) return m.WriteZeros(rec.disk, lo, hi - lo);
      return PwriteFull(m.disk_fds[rec.disk], rec.data.data() + (lo - rec.offset), hi - lo, lo, m.DiskPath(rec.disk));
    }));
  }
  return Status::Ok();
}

Status ReplicaStore::Apply(uint64_t sequence, const PointInfo& info, DeltaSource& source) {
  Impl& m = *impl_;
  std::lock_guard alk(m.apply_mu);
  if (m.broken)
    return Status::FailedPrecondition("replica store " + m.dir +
                                      ": a failed apply could not be rolled back; reopen it");
  if (m.load)  // apply_mu held: the load calls change it under it too
    return Status::FailedPrecondition("replica store " + m.dir + ": an initial load is in progress; delta " +
                                      std::to_string(sequence) + " cannot be applied until it is finished");
  const uint64_t latest = m.manifest.points.back().sequence;  // only writers change it: apply_mu held
  if (sequence <= latest)
    return Status::FailedPrecondition("delta " + std::to_string(sequence) + " is a duplicate: replica store " + m.dir +
                                      " has applied up to " + std::to_string(latest));
  if (sequence != latest + 1)
    return Status::FailedPrecondition("delta " + std::to_string(sequence) + " is out of sequence: replica store " +
                                      m.dir + " expects " + std::to_string(latest + 1));
  if (static_cast<uint16_t>(info.kind) > 3 || info.generation_id.size() > kMaxString)
    return Status::InvalidArgument("bad point info");
  // 1. The segment of the current latest point.
  {
    auto seg = std::make_unique<Segment>();
    seg->point_seq = latest;
    seg->upper_seq = sequence;
    seg->path = m.SegmentPath(latest);
    std::string header = EncodeSegmentHeader({m.bs(), latest, sequence, static_cast<uint32_t>(m.disks.size())});
    Status s = m.Step("undo.create", [&] {
      seg->fd = ::open(seg->path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      return seg->fd < 0 ? Errno("create", seg->path) : Status::Ok();
    });
    if (s.ok())
      s = m.Step("undo.header.write", [&] { return PwriteFull(seg->fd, header.data(), header.size(), 0, seg->path); });
    if (s.ok()) s = m.FsyncFd(seg->fd, "undo.header.fsync", seg->path);
    if (s.ok()) s = m.FsyncDir(m.UndoDir(), "undo.dir.fsync");
    seg->size = header.size();
    if (seg->fd < 0) return s;  // nothing was created: nothing to undo
    auto lk = m.WriteLock();
    m.inflight = std::move(seg);
    if (!s.ok()) {
      Status r = m.RollbackInflightLocked();
      if (!r.ok()) m.broken = true;
      return s;
    }
  }
  // 2..4: records in batches (group commit), disk fsyncs, trailer.
  Status s;
  uint64_t records = 0, bytes = 0, batches = 0;
  const uint64_t b = m.bs();
  std::shared_ptr<const DeltaRecord> cur;  // the record being cut into pieces
  uint64_t cur_next = 0, cur_end = 0;      // its blocks not yet in a batch
  bool eof = false;
  while (s.ok() && (cur || !eof)) {
    std::vector<BatchPiece> batch;
    Impl::UndoBatch undo(m);
    uint64_t used = 0;  // bytes of the blocks the batch touches
    while (used < m.opt.apply_batch_bytes) {
      if (!cur) {
        if (eof) break;
        auto next = source.Next();
        if (!next.ok()) {
          s = next.status().WithContext("delta " + std::to_string(sequence) + " source failed after " +
                                        std::to_string(records) + " record(s)");
          break;
        }
        if (!next->has_value()) {
          eof = true;
          break;
        }
        s = m.ValidateRecord(**next);
        if (!s.ok()) break;
        ++records;
        bytes += (*next)->length;
        cur = std::make_shared<const DeltaRecord>(std::move(**next));
        cur_next = cur->offset / b;
        cur_end = (cur->offset + cur->length - 1) / b + 1;
      }
      const uint64_t room = (m.opt.apply_batch_bytes - used + b - 1) / b;
      const uint64_t take = std::min({cur_end - cur_next, kPieceBlocks, room});
      batch.push_back({cur, cur_next, cur_next + take});
      used += take * b;
      cur_next += take;
      if (cur_next == cur_end) cur.reset();
      // Its before-images now, while the source may still be receiving.
      s = undo.Save(batch.back());
      if (!s.ok()) break;
    }
    if (s.ok() && !batch.empty()) {
      s = undo.SealAndWrite(batch);
      ++batches;
    }
  }
  for (uint32_t d = 0; s.ok() && d < m.disk_fds.size(); ++d) s = m.FsyncFd(m.disk_fds[d], "disk.fsync", m.DiskPath(d));
  if (s.ok()) {
    std::string trailer;
    AppendMarker(&trailer, kTrailerTag, m.inflight->size, m.inflight->index.size());
    s = m.Step("undo.trailer.write", [&] {
      return PwriteFull(m.inflight->fd, trailer.data(), trailer.size(), m.inflight->size, m.inflight->path);
    });
    if (s.ok()) s = m.FsyncFd(m.inflight->fd, "undo.trailer.fsync", m.inflight->path);
    if (s.ok()) {
      auto lk = m.WriteLock();  // readers check entries against the size
      m.inflight->size += trailer.size();
    }
  }
  // 5. Commit.
  Manifest next = m.manifest;
  next.points.push_back(ManifestPoint{sequence, info.time_ms, static_cast<uint16_t>(info.kind), info.generation_id});
  if (s.ok()) {
    s = m.WriteManifest(next);
    if (!s.ok()) {
      // The rename may or may not have reached the disk: only Open can
      // tell (it reads MANIFEST back), so neither roll back nor go on.
      spdlog::error("replica store {}: MANIFEST write for delta {} failed, reopen the store: {}", m.dir, sequence,
                    s.ToString());
      m.broken = true;
      return s.WithContext("delta " + std::to_string(sequence) + " may or may not be applied; reopen the store");
    }
  }
  if (!s.ok()) {
    spdlog::warn("replica store {}: apply of delta {} failed, rolling back: {}", m.dir, sequence, s.ToString());
    auto lk = m.WriteLock();
    Status r = m.RollbackInflightLocked();
    if (!r.ok()) {
      spdlog::error("replica store {}: rollback failed: {}", m.dir, r.ToString());
      m.broken = true;
    }
    return s;
  }
  {
    auto lk = m.WriteLock();
    m.manifest = std::move(next);
    m.segments[latest] = std::move(m.inflight);
  }
  spdlog::info("replica store {}: applied delta {} ({} record(s), {} byte(s), {} batch(es))", m.dir, sequence, records,
               bytes, batches);
  // 6, 7. The delta is committed: a failure from here on is logged and
  // retried at the next Apply / ApplyRetention / Open, never reported as a
  // failed apply (the caller would resend a delta that is already applied).
  Status r = m.Retention();
  if (!r.ok())
    spdlog::warn("replica store {}: retention after delta {} failed (retried later): {}", m.dir, sequence,
                 r.ToString());
  return Status::Ok();
}

// ---- Catalog mirror ------------------------------------------------------------

Status ReplicaStore::Impl::SyncCatalog() {
  if (catalog == nullptr) return Status::Ok();
  Manifest m;
  {
    auto lk = ReadLock();
    m = manifest;
  }
  Status s = catalog->RunInTransaction([&]() -> Status {
    VMR_ASSIGN_OR_RETURN(auto rows, catalog->ListRecoveryPoints(m.vm_id));
    // A row is kept only when every field matches its point: an adopted
    // point (docs section 18) may reuse a sequence with other details.
    std::map<std::string, const ManifestPoint*> want;
    for (const ManifestPoint& p : m.points) want[CatalogPointId(m.vm_id, p.sequence)] = &p;
    std::set<std::string> have;
    std::vector<std::string> drop;
    for (const RecoveryPointRecord& r : rows) {
      auto w = want.find(r.id);
      if (w == want.end() || r.sequence != w->second->sequence || r.time_ms != w->second->time_ms ||
          r.kind != w->second->kind || r.generation_id != w->second->generation) {
        drop.push_back(r.id);
      } else {
        have.insert(r.id);
      }
    }
    if (!drop.empty()) VMR_RETURN_IF_ERROR(catalog->DeleteRecoveryPoints(drop));
    for (const ManifestPoint& p : m.points) {
      std::string id = CatalogPointId(m.vm_id, p.sequence);
      if (have.count(id) != 0) continue;
      VMR_RETURN_IF_ERROR(catalog->AddRecoveryPoint({id, m.vm_id, p.time_ms, p.kind, p.sequence, p.generation}));
    }
    return Status::Ok();
  });
  if (!s.ok()) spdlog::warn("replica store {}: catalog not updated (retried later): {}", dir, s.ToString());
  return s;
}

// ---- Retention ---------------------------------------------------------------

// Drops retained point i (not the latest). mu not held. Never rewrites a
// segment (docs section 6): a middle point's segment is carried (older
// points still need its before-images), the oldest point's segment and the
// segments carried below the next point are deleted.
Status ReplicaStore::Impl::DropPoint(size_t i) {
  const uint64_t seq = manifest.points[i].sequence;
  Manifest next = manifest;
  next.points.erase(next.points.begin() + static_cast<long>(i));
  std::vector<uint64_t> unlink;
  if (i > 0) {
    next.carried.insert(std::upper_bound(next.carried.begin(), next.carried.end(), seq), seq);
  } else {
    const uint64_t new_oldest = next.points.front().sequence;
    unlink.push_back(seq);
    for (uint64_t c : next.carried)
      if (c < new_oldest) unlink.push_back(c);
    std::erase_if(next.carried, [&](uint64_t c) { return c < new_oldest; });
  }
  VMR_RETURN_IF_ERROR(WriteManifest(next));
  {
    auto lk = WriteLock();
    manifest = std::move(next);
    for (uint64_t u : unlink) segments.erase(u);
  }
  for (uint64_t u : unlink) {
    std::string path = SegmentPath(u);
    VMR_RETURN_IF_ERROR(Step("undo.unlink", [&] {
      return ::unlink(path.c_str()) == 0 || errno == ENOENT ? Status::Ok() : Errno("unlink", path);
    }));
  }
  spdlog::info("replica store {}: dropped point {}{}", dir, seq,
               i > 0 ? " (its undo segment is carried for the older points)" : "");
  if (unlink.empty()) return Status::Ok();
  return FsyncDir(UndoDir(), "undo.dir.fsync");
}

Status ReplicaStore::Impl::Retention() {
  if (const int h = pending_history.exchange(-1); h >= 0) opt.recovery_history_hours = h;
  std::lock_guard plk(pins_mu);
  const int64_t now = Now();
  const auto& pts = manifest.points;  // writers only change it under apply_mu, held
  const size_t n = pts.size();
  const int64_t fine_from = now - opt.fine_window_ms;
  const int64_t history_from = now - int64_t{opt.recovery_history_hours} * kHourMs;
  // The chosen point of each hour: newest app-consistent/planned, else newest.
  std::map<int64_t, size_t> chosen;
  for (size_t i = 0; i < n; ++i) {
    int64_t h = FloorHour(pts[i].time_ms);
    auto it = chosen.find(h);
    bool special = pts[i].kind >= 2;
    if (it == chosen.end() || special || pts[it->second].kind < 2) chosen[h] = i;
  }
  std::vector<bool> keep(n, false);
  std::vector<bool> extended(n, false);
  for (size_t i = 0; i < n; ++i) {
    bool hourly = chosen[FloorHour(pts[i].time_ms)] == i;
    if (i + 1 == n || pts[i].time_ms >= fine_from || pins.count(pts[i].sequence) > 0) {
      keep[i] = true;
    } else if (hourly && opt.recovery_history_hours > 0 && pts[i].time_ms >= history_from) {
      keep[i] = true;
    } else if (hourly && opt.extended_retention_bytes > 0) {
      keep[i] = extended[i] = true;
    }
  }
  // Drop oldest first; indices shift as points go.
  std::vector<uint64_t> drop_seqs, extended_seqs;
  for (size_t i = 0; i < n; ++i) {
    if (!keep[i]) drop_seqs.push_back(pts[i].sequence);
    if (extended[i]) extended_seqs.push_back(pts[i].sequence);
  }
  auto index_of = [&](uint64_t seq) -> size_t {
    for (size_t i = 0; i < manifest.points.size(); ++i)
      if (manifest.points[i].sequence == seq) return i;
    return manifest.points.size();
  };
  for (uint64_t seq : drop_seqs) {
    size_t i = index_of(seq);
    if (i + 1 >= manifest.points.size()) continue;  // gone already, or the latest
    Status s = DropPoint(i);
    if (!s.ok()) {
      // Dropping never reads a segment, so a corrupt one does not stop it;
      // an I/O error does (retried at the next Apply / ApplyRetention).
      spdlog::warn("replica store {}: could not drop point {}: {}", dir, seq, s.ToString());
      SyncCatalog().IgnoreError();
      return s;
    }
  }
  if (opt.extended_retention_bytes > 0) {
    for (uint64_t seq : extended_seqs) {
      uint64_t total = 0;
      for (const auto& [k, seg] : segments) total += seg->size;
      if (total <= opt.extended_retention_bytes) break;
      if (manifest.points.empty() || manifest.points.front().sequence != seq) break;  // oldest only
      Status s = DropPoint(0);
      if (!s.ok()) {
        SyncCatalog().IgnoreError();
        return s;
      }
    }
  }
  return SyncCatalog();  // a failure is logged inside and retried later
}

Status ReplicaStore::DropAllButLatest() {
  Impl& m = *impl_;
  std::lock_guard alk(m.apply_mu);
  if (m.broken)
    return Status::FailedPrecondition("replica store " + m.dir + ": a failed apply left it unsure; reopen it");
  if (m.load)
    return Status::FailedPrecondition("replica store " + m.dir + ": an initial load is in progress");
  std::lock_guard plk(m.pins_mu);  // no pin may appear between the check and the drop
  const uint64_t latest = m.manifest.points.back().sequence;  // writers change it under apply_mu, held
  for (const auto& [seq, count] : m.pins)
    if (seq != latest && count > 0)
      return Status::FailedPrecondition("replica store " + m.dir + ": point " + std::to_string(seq) +
                                        " is pinned (exported); cannot drop it");
  if (m.manifest.points.size() == 1 && m.manifest.carried.empty()) return Status::Ok();
  Manifest next = m.manifest;
  next.points.erase(next.points.begin(), next.points.end() - 1);
  next.carried.clear();
  // Commit: one rename. Before it the old set stands; after it every
  // segment is an orphan that the unlinks below (or Open) delete.
  VMR_RETURN_IF_ERROR(m.WriteManifest(next));
  std::vector<uint64_t> gone;
  {
    auto lk = m.WriteLock();
    for (const auto& [seq, seg] : m.segments) gone.push_back(seq);
    m.manifest = std::move(next);
    m.segments.clear();
  }
  Status s;
  for (uint64_t seq : gone) {
    std::string path = m.SegmentPath(seq);
    s = m.Step("undo.unlink", [&] {
      return ::unlink(path.c_str()) == 0 || errno == ENOENT ? Status::Ok() : Errno("unlink", path);
    });
    if (!s.ok()) break;
  }
  if (s.ok()) s = m.FsyncDir(m.UndoDir(), "undo.dir.fsync");
  if (!s.ok())
    spdlog::warn("replica store {}: dropped every point but {}; the next open removes leftover segments: {}", m.dir,
                 latest, s.ToString());
  spdlog::info("replica store {}: dropped every point but the latest ({}), {} undo segment(s)", m.dir, latest,
               gone.size());
  m.SyncCatalog().IgnoreError();  // logged inside; retried later
  return Status::Ok();
}

Status ReplicaStore::ApplyRetention() {
  std::lock_guard alk(impl_->apply_mu);
  if (impl_->broken)
    return Status::FailedPrecondition("replica store " + impl_->dir + ": a failed apply left it unsure; reopen it");
  return impl_->Retention();
}

Status ReplicaStore::SetRecoveryHistory(int hours) {
  if (hours < 0 || hours > 24) return Status::InvalidArgument("RecoveryHistory: " + std::to_string(hours) + " is not in 0..24");
  std::unique_lock alk(impl_->apply_mu, std::try_to_lock);
  if (!alk.owns_lock()) {
    // An apply runs: its retention (after its commit) takes the new value.
    impl_->pending_history.store(hours);
    return Status::Ok();
  }
  impl_->pending_history.store(-1);
  impl_->opt.recovery_history_hours = hours;
  if (impl_->broken) return Status::Ok();  // retention runs once the store is reopened
  return impl_->Retention();
}

Status ReplicaStore::PinPoint(uint64_t sequence) {
  Impl& m = *impl_;
  std::lock_guard plk(m.pins_mu);
  {
    auto lk = m.ReadLock();
    bool found = false;
    for (const ManifestPoint& p : m.manifest.points) found = found || p.sequence == sequence;
    if (!found) return Status::NotFound("recovery point " + std::to_string(sequence) + " is not retained in " + m.dir);
    if (m.load && sequence == 0)
      return Status::FailedPrecondition("replica store " + m.dir +
                                        ": point 0 cannot be pinned while an initial load is in progress");
  }
  ++m.pins[sequence];
  return Status::Ok();
}

Status ReplicaStore::UnpinPoint(uint64_t sequence) {
  Impl& m = *impl_;
  std::lock_guard plk(m.pins_mu);
  auto it = m.pins.find(sequence);
  if (it == m.pins.end()) return Status::NotFound("recovery point " + std::to_string(sequence) + " is not pinned");
  if (--it->second == 0) m.pins.erase(it);
  return Status::Ok();
}

// ---- Reads -------------------------------------------------------------------

std::vector<const Segment*> ReplicaStore::Impl::SegmentsFor(uint64_t seq) const {
  std::vector<const Segment*> out;
  for (auto it = segments.lower_bound(seq); it != segments.end(); ++it) out.push_back(it->second.get());
  if (inflight) out.push_back(inflight.get());
  return out;
}

Status ReplicaStore::Impl::CheckReadable(uint64_t seq, uint32_t disk) const {
  bool found = false;
  for (const ManifestPoint& p : manifest.points) found = found || p.sequence == seq;
  if (!found) return Status::NotFound("recovery point " + std::to_string(seq) + " is not retained in " + dir);
  if (load && seq == 0)
    return Status::FailedPrecondition("point 0 of " + dir +
                                      " cannot be read: an initial load is in progress (it is no longer empty)");
  if (disk >= disks.size()) return Status::NotFound("no disk " + std::to_string(disk) + " in " + dir);
  for (auto it = segments.lower_bound(seq); it != segments.end(); ++it)
    if (it->second->corrupt)
      return Status::Corruption("recovery point " + std::to_string(seq) +
                                " cannot be read: " + it->second->corrupt_message);
  return Status::Ok();
}

Status ReplicaStore::ReadPoint(uint64_t sequence, uint32_t disk, uint64_t offset, uint64_t length, char* out) const {
  const Impl& m = *impl_;
  auto lk = m.ReadLock();
  VMR_RETURN_IF_ERROR(m.CheckReadable(sequence, disk));
  const uint64_t size = m.disks[disk].size;
  if (offset > size || length > size - offset)
    return Status::InvalidArgument("read [" + std::to_string(offset) + ", +" + std::to_string(length) +
                                   ") is outside disk " + m.disks[disk].name);
  const std::vector<const Segment*> segs = m.SegmentsFor(sequence);
  const uint32_t b = m.bs();
  std::string block(b, '\0');
  uint64_t pos = offset;
  const uint64_t end = offset + length;
  while (pos < end) {
    uint64_t blk = pos / b;
    uint64_t in_block = pos - blk * b;
    uint64_t n = std::min<uint64_t>(b - in_block, end - pos);
    const Segment* src = nullptr;
    Loc loc;
    for (const Segment* s : segs) {
      auto it = s->index.find(Key(disk, blk));
      if (it != s->index.end()) {
        src = s;
        loc = it->second;
        break;
      }
    }
    if (src != nullptr) {
      VMR_RETURN_IF_ERROR(m.ReadBlockFromSegment(*src, loc, disk, blk, block.data()));
      std::memcpy(out + (pos - offset), block.data() + in_block, n);
      pos += n;
      continue;
    }
    // A run of blocks that no segment overrides: one read from the image.
    uint64_t run_end = pos + n;
    while (run_end < end) {
      uint64_t next_blk = run_end / b;
      bool overridden = false;
      for (const Segment* s : segs) overridden = overridden || s->index.count(Key(disk, next_blk)) != 0;
      if (overridden) break;
      run_end = std::min<uint64_t>(end, (next_blk + 1) * b);
    }
    VMR_RETURN_IF_ERROR(PreadFull(m.disk_fds[disk], out + (pos - offset), run_end - pos, pos, m.DiskPath(disk)));
    pos = run_end;
  }
  return Status::Ok();
}

Result<std::vector<ReplicaRange>> ReplicaStore::ChangedSince(uint64_t sequence) const {
  const Impl& m = *impl_;
  auto lk = m.ReadLock();
  bool found = false;
  for (const ManifestPoint& p : m.manifest.points) found = found || p.sequence == sequence;
  if (!found) return Status::NotFound("recovery point " + std::to_string(sequence) + " is not retained in " + m.dir);
  if (m.load && sequence == 0)
    return Status::FailedPrecondition("point 0 of " + m.dir +
                                      " cannot be compared: an initial load is in progress (it is no longer empty)");
  // Committed segments only: the delta in progress is not part of the latest point.
  std::vector<uint64_t> keys;
  for (auto it = m.segments.lower_bound(sequence); it != m.segments.end(); ++it) {
    if (it->second->corrupt)
      return Status::Corruption("blocks changed since point " + std::to_string(sequence) +
                                " are unknown: " + it->second->corrupt_message);
    for (const auto& [k, loc] : it->second->index) keys.push_back(k);
  }
  std::sort(keys.begin(), keys.end());  // (disk, block) order: the disk is the key's top bits
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  const uint64_t b = m.bs();
  std::vector<ReplicaRange> out;
  for (uint64_t k : keys) {
    const uint32_t disk = static_cast<uint32_t>(k >> 48);
    const uint64_t off = (k & ((uint64_t{1} << 48) - 1)) * b;
    if (!out.empty() && out.back().disk == disk && out.back().offset + out.back().length == off) {
      out.back().length += b;
    } else {
      out.push_back({disk, off, b});
    }
  }
  return out;
}

Result<std::vector<ReplicaExtent>> ReplicaStore::PointExtents(uint64_t sequence, uint32_t disk) const {
  const Impl& m = *impl_;
  auto lk = m.ReadLock();
  VMR_RETURN_IF_ERROR(m.CheckReadable(sequence, disk));
  const uint32_t b = m.bs();
  const uint64_t nblocks = m.disk_blocks[disk];
  // Overlay: block -> zero, oldest segment wins.
  std::map<uint64_t, bool> overlay;
  for (const Segment* s : m.SegmentsFor(sequence))
    for (const auto& [k, loc] : s->index)
      if (static_cast<uint32_t>(k >> 48) == disk) overlay.emplace(k & ((uint64_t{1} << 48) - 1), loc.zero);
  // Base: data/hole extents of the image, rounded out to blocks.
  std::vector<ReplicaExtent> out;
  auto emit = [&](uint64_t first, uint64_t count, bool zero) {
    if (count == 0) return;
    if (!out.empty() && out.back().zero == zero && out.back().offset + out.back().length == first * b) {
      out.back().length += count * b;
    } else {
      out.push_back({first * b, count * b, zero});
    }
  };
  auto emit_base = [&](uint64_t first, uint64_t end, bool zero) {  // [first, end) blocks, with overlay
    uint64_t pos = first;
    for (auto it = overlay.lower_bound(first); it != overlay.end() && it->first < end; ++it) {
      emit(pos, it->first - pos, zero);
      emit(it->first, 1, it->second);
      pos = it->first + 1;
    }
    emit(pos, end - pos, zero);
  };
  const int fd = m.disk_fds[disk];
  uint64_t blk = 0;
  while (blk < nblocks) {
    off_t d = ::lseek(fd, static_cast<off_t>(blk * b), SEEK_DATA);
    if (d < 0 && errno != ENXIO) return Errno("seek data in", m.DiskPath(disk));
    uint64_t data_blk = d < 0 ? nblocks : std::min<uint64_t>(nblocks, static_cast<uint64_t>(d) / b);
    emit_base(blk, data_blk, true);
    if (data_blk >= nblocks) break;
    off_t h = ::lseek(fd, static_cast<off_t>(data_blk * b), SEEK_HOLE);
    if (h < 0) return Errno("seek hole in", m.DiskPath(disk));
    uint64_t hole_blk = std::min<uint64_t>(nblocks, (static_cast<uint64_t>(h) + b - 1) / b);
    if (hole_blk <= data_blk) hole_blk = data_blk + 1;
    emit_base(data_blk, hole_blk, false);
    blk = hole_blk;
  }
  return out;
}

// ---- Initial load (docs section 17) -------------------------------------------

Status ReplicaStore::Impl::CheckLoadCall(const char* call) const {
  if (broken)
    return Status::FailedPrecondition(std::string(call) + ": replica store " + dir +
                                      " refuses changes after a failed step; reopen it");
  if (!load) return Status::FailedPrecondition(std::string(call) + ": no initial load is in progress in " + dir);
  return Status::Ok();
}

// Makes every chunk written so far durable, then says so in LOAD. A failed
// fdatasync may have dropped dirty pages of earlier chunks too, and a failed
// LOAD write leaves its rename unknown: both leave the store refusing calls
// until it is reopened (the load then continues from what LOAD says).
Status ReplicaStore::Impl::SyncLoadLocked() {
  if (load_written == load->done_chunks && load_unsynced == 0) return Status::Ok();
  Status s;
  for (uint32_t d = 0; s.ok() && d < disk_fds.size(); ++d) {
    s = Step("load.disk.fsync", [&] {
      return ::fdatasync(disk_fds[d]) == 0 ? Status::Ok() : Errno("fdatasync", DiskPath(d));
    });
  }
  LoadState next = *load;
  next.done_chunks = load_written;
  if (s.ok()) s = WriteLoad(next);
  if (!s.ok()) {
    broken = true;
    return s.WithContext("initial load of " + dir + ": sync after chunk " + std::to_string(load_written) +
                         " failed; reopen the store and continue from load_state()->done_chunks");
  }
  {
    auto lk = WriteLock();
    load->done_chunks = load_written;
  }
  load_unsynced = 0;
  return Status::Ok();
}

Status ReplicaStore::Impl::RecoverLoad() {
  const std::string path = LoadPath();
  struct stat fst {};
  if (::stat(path.c_str(), &fst) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return Errno("stat", path);
  }
  if (!S_ISREG(fst.st_mode) || static_cast<uint64_t>(fst.st_size) > kMaxLoadFile)
    return Status::Corruption("initial-load record " + path + ": not a regular file of at most 4096 bytes");
  VMR_ASSIGN_OR_RETURN(std::string bytes, ReadFile(path, kMaxLoadFile));
  VMR_ASSIGN_OR_RETURN(LoadState st, DecodeLoad(bytes, path));
  const ManifestPoint& oldest = manifest.points.front();
  if (manifest.points.back().sequence == 0) {
    load = st;
    load_written = st.done_chunks;
    spdlog::info("replica store {}: initial load ({}) in progress, {} chunk(s) durable", dir, st.info.source,
                 st.done_chunks);
    return Status::Ok();
  }
  // LOAD exists only while the latest point is 0, and the one step from 0
  // to 1 with LOAD present is FinishLoad's commit: a crash before its
  // unlink. Finish it.
  if (oldest.sequence == 1 && oldest.generation != st.info.point.generation_id)
    return Status::Corruption("initial-load record " + path + " names generation " + st.info.point.generation_id +
                              " but point 1 has " + oldest.generation);
  spdlog::info("replica store {}: initial load was committed; removing its record", dir);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return Errno("unlink", path);
  return FsyncDir(dir, "load.dir.fsync");
}

Status ReplicaStore::AdoptSeedFile(uint32_t disk, const std::string& path) {
  Impl& m = *impl_;
  if (disk >= m.disks.size()) {
    return Status::InvalidArgument("AdoptSeedFile: disk " + std::to_string(disk) + " of " + m.dir + " does not exist");
  }
  std::lock_guard alk(m.apply_mu);
  if (m.broken) {
    return Status::FailedPrecondition("AdoptSeedFile: replica store " + m.dir +
                                      " refuses changes after a failed step; reopen it");
  }
  if (m.load) return Status::FailedPrecondition("AdoptSeedFile: an initial load is in progress in " + m.dir);
  const uint64_t latest = m.manifest.points.back().sequence;  // writers change it under apply_mu, held
  if (latest != 0) {
    return Status::FailedPrecondition("AdoptSeedFile: replica store " + m.dir + " is at point " +
                                      std::to_string(latest) + "; a seed copy needs the empty store (point 0)");
  }
  std::lock_guard plk(m.pins_mu);
  if (!m.pins.empty()) return Status::FailedPrecondition("AdoptSeedFile: point 0 of " + m.dir + " is pinned");
  const int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno == ENOENT) return Status::NotFound("no such file: " + path);
    return Errno("open seed copy", path);
  }
  struct Closer {
    int fd;
    ~Closer() {
      if (fd >= 0) ::close(fd);
    }
  } closer{fd};
  struct stat st {}, dirst {};
  if (::fstat(fd, &st) != 0) return Errno("stat", path);
  const std::string disks_dir = m.dir + "/disks";
  if (::stat(disks_dir.c_str(), &dirst) != 0) return Errno("stat", disks_dir);
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument("'" + path + "' is not a regular file");
  if (static_cast<uint64_t>(st.st_size) != m.disks[disk].size) {
    return Status::InvalidArgument("the copy '" + path + "' is " + std::to_string(st.st_size) + " bytes, disk '" +
                                   m.disks[disk].name + "' " + std::to_string(m.disks[disk].size) + " bytes");
  }
  if (st.st_nlink != 1) {
    return Status::InvalidArgument("'" + path + "' has " + std::to_string(st.st_nlink) +
                                   " hard links: another name would still write into the replica's disk");
  }
  if (st.st_dev != dirst.st_dev) {
    return Status::InvalidArgument("'" + path + "' is on another file system than the replica store " + m.dir +
                                   ": it can only be copied, not moved");
  }
  for (uint32_t d = 0; d < m.disk_fds.size(); ++d) {
    struct stat own {};
    if (::fstat(m.disk_fds[d], &own) == 0 && own.st_dev == st.st_dev && own.st_ino == st.st_ino) {
      return Status::InvalidArgument("'" + path + "' is disk '" + m.disks[d].name + "' of this store already");
    }
  }
  if (::fchmod(fd, 0600) != 0) return Errno("chmod", path);
  // The file checked above is the one that becomes the disk, whatever
  // happens to `path` meanwhile: it is linked by its open descriptor
  // (/proc/self/fd, which needs no privilege), then renamed over the disk
  // file; the copy's own name is removed only if it still names it.
  const std::string target = m.DiskPath(disk);
  const std::string staged = target + ".adopt";
  const std::string by_fd = "/proc/self/fd/" + std::to_string(fd);
  if (::unlink(staged.c_str()) != 0 && errno != ENOENT) return Errno("unlink", staged);
  if (::linkat(AT_FDCWD, by_fd.c_str(), AT_FDCWD, staged.c_str(), AT_SYMLINK_FOLLOW) != 0) {
    return Errno("link the copy '" + path + "' as", staged);
  }
  if (::rename(staged.c_str(), target.c_str()) != 0) {
    Status e = Errno("rename to " + target + " from", staged);
    ::unlink(staged.c_str());
    return e;
  }
  // From here the disk's path names the copy: the open descriptor follows
  // it. Without the switch the store would write the unlinked old file.
  if (::dup3(fd, m.disk_fds[disk], O_CLOEXEC) < 0) {
    m.broken = true;
    return Errno("switching the disk's descriptor to", target);
  }
  VMR_RETURN_IF_ERROR(m.FsyncDir(disks_dir, "adopt-seed.dir.fsync"));
  struct stat named {};
  if (::lstat(path.c_str(), &named) == 0 && named.st_dev == st.st_dev && named.st_ino == st.st_ino) {
    if (::unlink(path.c_str()) != 0) return Errno("unlink the copy's name", path);
  } else {
    spdlog::warn("replica store {}: '{}' no longer names the copy that became disk {}; it is left as it is", m.dir,
                 path, m.disks[disk].name);
  }
  const std::string parent = std::filesystem::path(path).parent_path().string();
  if (!parent.empty() && parent != disks_dir) VMR_RETURN_IF_ERROR(m.FsyncDir(parent, "adopt-seed.source-dir.fsync"));
  return Status::Ok();
}

Status ReplicaStore::BeginLoad(const LoadInfo& info) {
  Impl& m = *impl_;
  VMR_RETURN_IF_ERROR(CheckLoadInfo(info));
  std::lock_guard alk(m.apply_mu);
  if (m.broken)
    return Status::FailedPrecondition("BeginLoad: replica store " + m.dir +
                                      " refuses changes after a failed step; reopen it");
  if (m.load) return Status::FailedPrecondition("BeginLoad: an initial load is already in progress in " + m.dir);
  const uint64_t latest = m.manifest.points.back().sequence;  // writers change it under apply_mu, held
  if (latest != 0)
    return Status::FailedPrecondition("BeginLoad: replica store " + m.dir + " is at point " +
                                      std::to_string(latest) + "; an initial load needs the empty store (point 0)");
  std::lock_guard plk(m.pins_mu);  // no pin may appear between the check and the LOAD
  if (!m.pins.empty())
    return Status::FailedPrecondition("BeginLoad: point 0 of " + m.dir + " is pinned (exported)");
  LoadState st{info, 0};
  Status s = m.WriteLoad(st);
  if (!s.ok()) {
    // The rename may have happened: without LOAD gone, a later Open would
    // find a load nobody runs.
    const std::string path = m.LoadPath();
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) m.broken = true;
    return s.WithContext("BeginLoad");
  }
  {
    auto lk = m.WriteLock();
    m.load = std::move(st);
  }
  m.load_written = 0;
  m.load_unsynced = 0;
  spdlog::info("replica store {}: initial load ({}) of point 1 begun, generation {}", m.dir, info.source,
               info.point.generation_id);
  return Status::Ok();
}

Status ReplicaStore::RestartLoad(const LoadInfo& info) {
  Impl& m = *impl_;
  VMR_RETURN_IF_ERROR(CheckLoadInfo(info));
  std::lock_guard alk(m.apply_mu);
  VMR_RETURN_IF_ERROR(m.CheckLoadCall("RestartLoad"));
  LoadState st{info, 0};
  VMR_RETURN_IF_ERROR(m.WriteLoad(st).WithContext("RestartLoad"));
  {
    auto lk = m.WriteLock();
    m.load = std::move(st);
  }
  m.load_written = 0;
  m.load_unsynced = 0;
  spdlog::info("replica store {}: initial load ({}) of point 1 restarted from its first chunk, generation {}", m.dir,
               info.source, info.point.generation_id);
  return Status::Ok();
}

std::optional<LoadState> ReplicaStore::load_state() const {
  auto lk = impl_->ReadLock();
  return impl_->load;
}

Status ReplicaStore::LoadChunk(uint64_t chunk, DeltaSource& records) {
  Impl& m = *impl_;
  std::lock_guard alk(m.apply_mu);
  VMR_RETURN_IF_ERROR(m.CheckLoadCall("LoadChunk"));
  if (chunk != m.load_written)
    return Status::FailedPrecondition("LoadChunk: chunk " + std::to_string(chunk) + " is out of order in " + m.dir +
                                      ", expected chunk " + std::to_string(m.load_written));
  // No lock around the writes: during a load no reader may touch the disks
  // (point 0 is refused and no other point exists).
  uint64_t count = 0, bytes = 0;
  const std::string where = "load chunk " + std::to_string(chunk) + " of " + m.dir;
  // The byte range each disk's data records of this chunk span, for the
  // writeback started below.
  std::vector<std::pair<uint64_t, uint64_t>> written(m.disk_fds.size(), {UINT64_MAX, 0});
  for (;;) {
    auto next = records.Next();
    if (!next.ok())
      return next.status().WithContext(where + ": source failed after " + std::to_string(count) +
                                       " record(s); the chunk counts as not written");
    if (!next->has_value()) break;
    const DeltaRecord& rec = **next;
    Status s = m.ValidateRecord(rec);
    if (s.ok()) {
      s = m.Step("load.disk.write", [&] {
        if (rec.zero) return m.WriteZeros(rec.disk, rec.offset, rec.length);
        return PwriteFull(m.disk_fds[rec.disk], rec.data.data(), rec.length, rec.offset, m.DiskPath(rec.disk));
      });
    }
    if (!s.ok())
      return s.WithContext(where + ", record " + std::to_string(count) + "; the chunk counts as not written");
    ++count;
    if (!rec.zero) {
      bytes += rec.length;
      auto& [lo, hi] = written[rec.disk];
      lo = std::min(lo, rec.offset);
      hi = std::max(hi, rec.offset + rec.length);
    }
  }
  // Start writing the chunk's pages to the device now, without waiting for
  // them (docs/replica_store.md section 17): the fdatasync every load_sync_bytes
  // then finds them written or under way instead of writing all of them
  // while the stream waits. Only a hint: durability still comes from that
  // fdatasync, which reports any write error, so a failure here is ignored.
  for (size_t d = 0; d < written.size(); ++d) {
    const auto [lo, hi] = written[d];
    if (hi > lo) {
      (void)::sync_file_range(m.disk_fds[d], static_cast<off_t>(lo), static_cast<off_t>(hi - lo),
                              SYNC_FILE_RANGE_WRITE);
    }
  }
  ++m.load_written;
  m.load_unsynced += bytes;
  if (m.load_unsynced >= m.opt.load_sync_bytes) return m.SyncLoadLocked();
  return Status::Ok();
}

Status ReplicaStore::SyncLoad() {
  Impl& m = *impl_;
  std::lock_guard alk(m.apply_mu);
  VMR_RETURN_IF_ERROR(m.CheckLoadCall("SyncLoad"));
  return m.SyncLoadLocked();
}

Status ReplicaStore::FinishLoad() {
  Impl& m = *impl_;
  std::lock_guard alk(m.apply_mu);
  VMR_RETURN_IF_ERROR(m.CheckLoadCall("FinishLoad"));
  VMR_RETURN_IF_ERROR(m.SyncLoadLocked());
  // fdatasync leaves metadata such as punched ranges to this fsync.
  for (uint32_t d = 0; d < m.disk_fds.size(); ++d)
    VMR_RETURN_IF_ERROR(m.FsyncFd(m.disk_fds[d], "load.disk.fsync", m.DiskPath(d)));
  // Commit (shared with Adopt). A failed write leaves the store refusing
  // changes: the rename may or may not have reached the disk, Open decides.
  Status s = m.CommitOnlyPoint(m.OnlyPoint(1, m.load->info.point), [&] { m.load.reset(); });
  if (!s.ok()) return s.WithContext("FinishLoad: point 1 may or may not be committed; reopen the store");
  const uint64_t chunks = m.load_written;
  m.load_written = 0;
  m.load_unsynced = 0;
  Status u = m.UnlinkLoad();
  if (!u.ok())
    spdlog::warn("replica store {}: point 1 committed; LOAD not removed (the next open removes it): {}", m.dir,
                 u.ToString());
  spdlog::info("replica store {}: initial load finished, {} chunk(s): point 1 committed", m.dir, chunks);
  m.SyncCatalog().IgnoreError();  // logged inside; retried at the next Apply / Open
  return Status::Ok();
}

Status ReplicaStore::AbandonLoad() {
  Impl& m = *impl_;
  std::lock_guard alk(m.apply_mu);
  VMR_RETURN_IF_ERROR(m.CheckLoadCall("AbandonLoad"));
  // First LOAD says nothing is durable, so that a crash while the holes
  // are punched never claims a chunk whose data is gone.
  LoadState zero = *m.load;
  zero.done_chunks = 0;
  VMR_RETURN_IF_ERROR(m.WriteLoad(zero).WithContext("AbandonLoad"));
  {
    auto lk = m.WriteLock();
    m.load->done_chunks = 0;
  }
  m.load_written = 0;
  m.load_unsynced = 0;
  for (uint32_t d = 0; d < m.disk_fds.size(); ++d) {
    VMR_RETURN_IF_ERROR(
        m.Step("load.punch", [&] { return m.WriteZeros(d, 0, m.disks[d].size); }).WithContext("AbandonLoad"));
    VMR_RETURN_IF_ERROR(m.FsyncFd(m.disk_fds[d], "load.disk.fsync", m.DiskPath(d)).WithContext("AbandonLoad"));
  }
  const std::string path = m.LoadPath();
  Status s = m.Step("load.unlink", [&] {
    return ::unlink(path.c_str()) == 0 || errno == ENOENT ? Status::Ok() : Errno("unlink", path);
  });
  if (!s.ok()) return s.WithContext("AbandonLoad");
  {
    auto lk = m.WriteLock();
    m.load.reset();
  }
  VMR_RETURN_IF_ERROR(m.FsyncDir(m.dir, "load.dir.fsync").WithContext("AbandonLoad"));
  spdlog::info("replica store {}: initial load abandoned; the disks are empty again (point 0)", m.dir);
  return Status::Ok();
}

// ---- Adoption (docs section 18) ------------------------------------------------

Status ReplicaStore::Impl::FinishAdopt(const std::vector<std::string>& drop_disks) {
  // Every undo file is an orphan of the old store, never an apply to roll
  // back: the adopted point is the only one and the disks are its content.
  std::error_code ec;
  std::vector<std::string> files;
  for (const auto& e : std::filesystem::directory_iterator(UndoDir(), ec)) {
    const std::string name = e.path().filename().string();
    if (name.ends_with(".vru") || name.ends_with(".tmp")) files.push_back(e.path().string());
  }
  if (ec) return Status::IOError("list " + UndoDir() + ": " + ec.message());
  for (const std::string& path : files) VMR_RETURN_IF_ERROR(UnlinkStep("undo.unlink", path));
  if (!files.empty()) VMR_RETURN_IF_ERROR(FsyncDir(UndoDir(), "undo.dir.fsync"));
  for (const std::string& name : drop_disks)
    VMR_RETURN_IF_ERROR(UnlinkStep("adopt.disk.unlink", dir + "/disks/" + name + ".img"));
  if (!drop_disks.empty()) VMR_RETURN_IF_ERROR(FsyncDir(dir + "/disks", "disks.dir.fsync"));
  VMR_RETURN_IF_ERROR(UnlinkStep("adopt.unlink", AdoptPath()));
  return FsyncDir(dir, "adopt.dir.fsync");
}

Status ReplicaStore::Impl::RecoverAdopt(const std::optional<std::string>& manifest_bytes) {
  const std::string path = AdoptPath();
  struct stat fst {};
  if (::stat(path.c_str(), &fst) != 0) {
    if (errno == ENOENT) return Status::Ok();
    return Errno("stat", path);
  }
  if (!S_ISREG(fst.st_mode) || static_cast<uint64_t>(fst.st_size) > kMaxAdoptFile)
    return Status::Corruption("adoption record " + path + ": not a regular file of at most 128 KiB");
  VMR_ASSIGN_OR_RETURN(std::string bytes, ReadFile(path, kMaxAdoptFile));
  VMR_ASSIGN_OR_RETURN(AdoptRecord rec, DecodeAdopt(bytes, path));
  const bool committed =
      manifest_bytes && XXH3_64bits(manifest_bytes->data(), manifest_bytes->size()) == rec.manifest_xxh3;
  if (!committed) {
    // The old store (or none) stands: only the record goes.
    spdlog::info("replica store {}: adoption of point {} did not commit; its record is removed", dir, rec.sequence);
    VMR_RETURN_IF_ERROR(UnlinkStep("adopt.unlink", path));
    return FsyncDir(dir, "adopt.dir.fsync");
  }
  VMR_ASSIGN_OR_RETURN(Manifest m, DecodeManifest(*manifest_bytes));
  if (m.points.size() != 1 || m.points[0].sequence != rec.sequence || m.points[0].generation != rec.generation ||
      !m.carried.empty())
    return Status::Corruption("adoption record " + path + " does not describe MANIFEST");
  for (const std::string& name : rec.drop_disks)
    for (const ReplicaDisk& d : m.disks)
      if (d.name == name)
        return Status::Corruption("adoption record " + path + " would delete disk " + name + ", which MANIFEST lists");
  spdlog::info("replica store {}: adoption of point {} was committed; removing the old store's files", dir,
               rec.sequence);
  return FinishAdopt(rec.drop_disks);
}

Result<std::unique_ptr<ReplicaStore>> ReplicaStore::Adopt(const std::string& dir, const std::string& vm_id,
                                                          const std::vector<ReplicaDisk>& disks, uint64_t sequence,
                                                          const PointInfo& info, Catalog* catalog,
                                                          ReplicaStoreOptions options) {
  VMR_RETURN_IF_ERROR(CheckStoreArgs(vm_id, disks));
  if (sequence == 0 || sequence == UINT64_MAX)
    return Status::InvalidArgument("Adopt: sequence " + std::to_string(sequence) + " is not in 1..2^64-2");
  if (static_cast<uint16_t>(info.kind) > 3) return Status::InvalidArgument("Adopt: bad point kind");
  if (!IsHex32(info.generation_id))
    return Status::InvalidArgument("Adopt: generation '" + info.generation_id + "' is not 32 hex digits");
  VMR_RETURN_IF_ERROR(CheckOptions(options));
  VMR_RETURN_IF_ERROR(MakeDirs(dir + "/disks"));
  VMR_RETURN_IF_ERROR(MakeDirs(dir + "/undo"));
  auto impl = std::make_unique<Impl>();
  Impl& m = *impl;
  m.dir = dir;
  m.catalog = catalog;
  m.opt = std::move(options);
  VMR_ASSIGN_OR_RETURN(FileLock lock, FileLock::Acquire(dir + "/LOCK"));
  m.lock.emplace(std::move(lock));

  // 1. The existing store, if any, once an earlier adoption's record is
  // settled (its cleanup finished, or the record dropped).
  std::optional<std::string> old_bytes;
  {
    struct stat fst {};
    if (::stat(m.ManifestPath().c_str(), &fst) == 0) {
      VMR_ASSIGN_OR_RETURN(std::string b, ReadFile(m.ManifestPath()));
      old_bytes = std::move(b);
    } else if (errno != ENOENT) {
      return Errno("stat", m.ManifestPath());
    }
  }
  VMR_RETURN_IF_ERROR(m.RecoverAdopt(old_bytes));
  std::optional<Manifest> old;
  if (old_bytes) {
    auto dec = DecodeManifest(*old_bytes);
    if (!dec.ok()) return dec.status().WithContext("Adopt: the existing store in " + dir + " (remove it to adopt)");
    old = std::move(dec).value();
    if (old->vm_id != vm_id)
      return Status::InvalidArgument("Adopt: " + dir + " holds the store of VM " + old->vm_id + ", not of " + vm_id);
  }
  // 2. Checks, before any change. A load in progress is refused; a LOAD
  // left by a committed load (or without a store) is removed below, as
  // Open (or Create) would remove it.
  bool stale_load = false;
  {
    struct stat fst {};
    if (::stat(m.LoadPath().c_str(), &fst) == 0) {
      if (old && old->points.back().sequence == 0)
        return Status::FailedPrecondition("Adopt: the store in " + dir +
                                          " has an initial load in progress (LOAD); finish or abandon it first");
      stale_load = true;
    } else if (errno != ENOENT) {
      return Errno("stat", m.LoadPath());
    }
  }
  m.vm_id = m.manifest.vm_id = vm_id;
  m.disks = m.manifest.disks = disks;
  for (uint32_t d = 0; d < disks.size(); ++d) {
    const std::string p = m.DiskPath(d);
    struct stat fst {};
    if (::stat(p.c_str(), &fst) != 0) {
      if (errno == ENOENT) return Status::NotFound("Adopt: disk file " + p + " is missing");
      return Errno("stat", p);
    }
    if (!S_ISREG(fst.st_mode)) return Status::InvalidArgument("Adopt: disk file " + p + " is not a regular file");
    int fd = ::open(p.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return Errno("open disk image", p);
    m.disk_fds.push_back(fd);
    if (::fstat(fd, &fst) != 0) return Errno("stat", p);
    if (!S_ISREG(fst.st_mode)) return Status::InvalidArgument("Adopt: disk file " + p + " is not a regular file");
    if (static_cast<uint64_t>(fst.st_size) != disks[d].size)
      return Status::InvalidArgument("Adopt: disk file " + p + " has " + std::to_string(fst.st_size) +
                                     " bytes, disk " + disks[d].name + " has " + std::to_string(disks[d].size));
    m.disk_blocks.push_back(disks[d].size / kReplicaBlockSize);
  }
  std::vector<std::string> drop_disks;  // the old store's images that are not adopted
  if (old) {
    for (const ReplicaDisk& od : old->disks) {
      bool kept = false;
      for (const ReplicaDisk& nd : disks) kept = kept || nd.name == od.name;
      if (!kept) drop_disks.push_back(od.name);
    }
  }
  // 3. Until the commit nothing below changes what Open sees (but the
  // removal of a LOAD that Open would remove as well).
  if (stale_load) VMR_RETURN_IF_ERROR(m.UnlinkLoad());
  for (uint32_t d = 0; d < m.disk_fds.size(); ++d)
    VMR_RETURN_IF_ERROR(m.FsyncFd(m.disk_fds[d], "disk.fsync", m.DiskPath(d)));
  VMR_RETURN_IF_ERROR(m.FsyncDir(dir + "/disks", "disks.dir.fsync"));
  Manifest next = m.OnlyPoint(sequence, info);
  const std::string encoded = EncodeManifest(next);
  const AdoptRecord rec{sequence, info.generation_id, XXH3_64bits(encoded.data(), encoded.size()), drop_disks};
  VMR_RETURN_IF_ERROR(
      m.Step("adopt.write", [&] { return WriteFileAtomic(m.AdoptPath(), EncodeAdopt(rec), 0600); }));
  // 4. Commit (shared with FinishLoad).
  Status s = m.CommitOnlyPoint(std::move(next), nullptr);
  if (!s.ok())
    return s.WithContext("Adopt: point " + std::to_string(sequence) + " of " + dir +
                         " may or may not be adopted; Open or the same Adopt again decides");
  // 5. Cleanup: the old store's files, then ADOPT.
  s = m.FinishAdopt(drop_disks);
  if (!s.ok())
    return s.WithContext("Adopt: point " + std::to_string(sequence) + " of " + dir +
                         " is adopted but its cleanup failed; Open or the same Adopt again finishes it");
  spdlog::info("replica store {}: adopted {} disk(s) of VM {} as point {} (generation {}){}", dir, disks.size(), vm_id,
               sequence, info.generation_id, old ? ", replacing the store that was there" : "");
  m.SyncCatalog().IgnoreError();  // logged inside; retried at the next Apply / Open
  return std::unique_ptr<ReplicaStore>(new ReplicaStore(std::move(impl)));
}

// ---- Accessors ---------------------------------------------------------------

uint64_t ReplicaStore::latest_sequence() const {
  auto lk = impl_->ReadLock();
  return impl_->manifest.points.back().sequence;
}
const std::string& ReplicaStore::vm_id() const { return impl_->vm_id; }
const std::vector<ReplicaDisk>& ReplicaStore::disks() const { return impl_->disks; }
std::string ReplicaStore::DiskPath(uint32_t disk) const {
  return disk < impl_->disks.size() ? impl_->DiskPath(disk) : std::string();
}

std::vector<ReplicaPoint> ReplicaStore::ListPoints() const {
  auto lk = impl_->ReadLock();
  std::vector<ReplicaPoint> out;
  for (const ManifestPoint& p : impl_->manifest.points) {
    ReplicaPoint r{p.sequence, p.time_ms, static_cast<ReplicationType>(p.kind), p.generation, true};
    for (auto it = impl_->segments.lower_bound(p.sequence); it != impl_->segments.end(); ++it)
      r.readable = r.readable && !it->second->corrupt;
    out.push_back(std::move(r));
  }
  return out;
}

}  // namespace vmreplica
