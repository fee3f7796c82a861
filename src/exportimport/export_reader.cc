// ExportReader: validation of an export directory and hash-checked reads of
// its chunks. Refusals: docs/export_format.md section 8.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>

#include "exportimport/export_format.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/initial_export.h"

namespace vmreplica {

struct ExportReader::State {
  std::string dir;
  exportimport::Manifest manifest;
};

namespace {

using exportimport::DataFileName;

Status Errno(const std::string& what) {
  return Status::IOError(what + ": " + std::strerror(errno));
}

// Reads chunks of one export; keeps the current data file open and one zstd
// context. Used by one thread at a time.
class ChunkFetcher {
 public:
  explicit ChunkFetcher(std::shared_ptr<const ExportReader::State> state)
      : state_(std::move(state)) {}
  ~ChunkFetcher() {
    if (fd_ >= 0) ::close(fd_);
    if (dctx_ != nullptr) ZSTD_freeDCtx(dctx_);
  }
  ChunkFetcher(const ChunkFetcher&) = delete;
  ChunkFetcher& operator=(const ChunkFetcher&) = delete;

  // The uncompressed bytes of data chunk i, hash checked.
  Result<std::string> Fetch(size_t i) {
    const exportimport::Manifest& m = state_->manifest;
    const ExportChunk& c = m.chunks[i];
    if (fd_ < 0 || fd_file_ != c.file_index) {
      if (fd_ >= 0) ::close(fd_);
      const std::string path = state_->dir + "/" + DataFileName(c.file_index);
      fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
      if (fd_ < 0) {
        if (errno == ENOENT || errno == ELOOP)
          return Status::InvalidArgument(exportimport::ChunkName(m, i) + ": data file " +
                                         DataFileName(c.file_index) + " is missing");
        return Errno("open " + path);
      }
      fd_file_ = c.file_index;
    }
    // Bounded by the manifest's rules: stored_length <= length <= chunk_size.
    stored_.resize(static_cast<size_t>(c.stored_length));
    uint64_t got = 0;
    while (got < c.stored_length) {
      ssize_t n = ::pread(fd_, stored_.data() + got, static_cast<size_t>(c.stored_length - got),
                          static_cast<off_t>(c.file_offset + got));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Errno("read " + DataFileName(c.file_index));
      if (n == 0)
        return Status::InvalidArgument(exportimport::ChunkName(m, i) + ": data file " +
                                       DataFileName(c.file_index) + " is truncated");
      got += static_cast<uint64_t>(n);
    }
    std::string out;
    if (c.zstd) {
      const unsigned long long declared = ZSTD_getFrameContentSize(stored_.data(), stored_.size());
      if (declared != c.length)
        return Status::InvalidArgument(exportimport::ChunkName(m, i) +
                                       " does not decompress (bad frame header)");
      if (dctx_ == nullptr) {
        dctx_ = ZSTD_createDCtx();
        if (dctx_ == nullptr) return Status::Internal("ZSTD_createDCtx failed");
      }
      out.resize(static_cast<size_t>(c.length));
      const size_t n =
          ZSTD_decompressDCtx(dctx_, out.data(), out.size(), stored_.data(), stored_.size());
      if (ZSTD_isError(n) || n != c.length)
        return Status::InvalidArgument(exportimport::ChunkName(m, i) + " does not decompress");
    } else {
      out.swap(stored_);
    }
    if (!(HashBytes(out.data(), out.size()) == c.hash))
      return Status::InvalidArgument(exportimport::ChunkName(m, i) + " fails its hash");
    return out;
  }

 private:
  std::shared_ptr<const ExportReader::State> state_;
  int fd_ = -1;
  uint32_t fd_file_ = 0;
  ZSTD_DCtx* dctx_ = nullptr;
  std::string stored_;
};

class ExportRecords final : public DeltaSource {
 public:
  ExportRecords(std::shared_ptr<const ExportReader::State> state, size_t first)
      : state_(state), fetcher_(state), next_(first) {}

  Result<std::optional<DeltaRecord>> Next() override {
    if (!failed_.ok()) return failed_;
    const auto& chunks = state_->manifest.chunks;
    if (next_ >= chunks.size()) return std::optional<DeltaRecord>();
    const size_t i = next_;
    const ExportChunk& c = chunks[i];
    if (c.zero) {
      ++next_;
      return std::optional<DeltaRecord>(ZeroRecord(c.disk, c.offset, c.length));
    }
    auto data = fetcher_.Fetch(i);
    if (!data.ok()) {
      failed_ = data.status();
      return failed_;
    }
    ++next_;
    return std::optional<DeltaRecord>(DataRecord(c.disk, c.offset, std::move(data).value()));
  }

 private:
  std::shared_ptr<const ExportReader::State> state_;
  ChunkFetcher fetcher_;
  size_t next_;
  Status failed_;
};

}  // namespace

ExportReader::ExportReader(std::shared_ptr<const State> state) : state_(std::move(state)) {}
ExportReader::~ExportReader() = default;

Result<std::unique_ptr<ExportReader>> ExportReader::Open(const std::string& dir,
                                                         const std::string& expected_vm_id) {
  auto expected = exportimport::NormalizeUuid(expected_vm_id);
  if (!expected.ok()) return expected.status();
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR)
      return Status::NotFound("export directory " + dir + " does not exist");
    return Errno("stat " + dir);
  }
  if (!S_ISDIR(st.st_mode)) return Status::NotFound(dir + " is not a directory");
  const std::string manifest_path = dir + "/" + exportimport::kManifestName;
  auto text = ReadFile(manifest_path, exportimport::kMaxManifestBytes);
  if (!text.ok()) {
    if (text.status().code() == Code::kNotFound)
      return Status::NotFound(dir + " has no " + exportimport::kManifestName +
                              ": no export there, or an incomplete one");
    return text.status();
  }
  auto decoded = exportimport::DecodeManifest(*text);
  if (!decoded.ok()) return decoded.status().WithContext(manifest_path);
  auto state = std::make_shared<State>();
  state->dir = dir;
  state->manifest = std::move(decoded).value();
  const exportimport::Manifest& m = state->manifest;
  if (m.info.vm_id != *expected)
    return Status::InvalidArgument("manifest is for VM " + m.info.vm_id + ", not " + *expected);
  for (size_t f = 0; f < m.file_sizes.size(); ++f) {
    const std::string name = DataFileName(static_cast<uint32_t>(f));
    const std::string path = dir + "/" + name;
    struct stat fs;
    if (::lstat(path.c_str(), &fs) != 0) {
      if (errno == ENOENT) return Status::InvalidArgument("data file " + name + " is missing");
      return Errno("stat " + path);
    }
    if (!S_ISREG(fs.st_mode))
      return Status::InvalidArgument("data file " + name + " is not a regular file");
    if (static_cast<uint64_t>(fs.st_size) != m.file_sizes[f])
      return Status::InvalidArgument("data file " + name + " has " + std::to_string(fs.st_size) +
                                     " bytes, the manifest says " +
                                     std::to_string(m.file_sizes[f]));
  }
  return std::unique_ptr<ExportReader>(new ExportReader(std::move(state)));
}

const std::string& ExportReader::directory() const { return state_->dir; }
const ExportInfo& ExportReader::info() const { return state_->manifest.info; }
uint32_t ExportReader::chunk_size() const { return state_->manifest.chunk_size; }
const ExportTotals& ExportReader::totals() const { return state_->manifest.totals; }
size_t ExportReader::chunk_count() const { return state_->manifest.chunks.size(); }
const ExportChunk& ExportReader::chunk(size_t i) const { return state_->manifest.chunks.at(i); }
std::string ExportReader::ChunkName(size_t i) const {
  return exportimport::ChunkName(state_->manifest, i);
}

Status ExportReader::VerifyAll(const ExportProgress& progress,
                               const std::atomic<bool>* cancel) const {
  const auto& m = state_->manifest;
  uint64_t total = 0;
  for (const ExportDisk& d : m.info.disks) total += d.size;
  ChunkFetcher fetcher(state_);
  uint64_t done = 0;
  for (size_t i = 0; i < m.chunks.size(); ++i) {
    if (cancel != nullptr && cancel->load())
      return Status::Cancelled("verification of " + state_->dir + " cancelled");
    if (!m.chunks[i].zero) VMR_RETURN_IF_ERROR(fetcher.Fetch(i).status());
    done += m.chunks[i].length;
    if (progress) progress(done, total);
  }
  return Status::Ok();
}

Result<std::unique_ptr<DeltaSource>> ExportReader::Records(size_t first_chunk) const {
  if (first_chunk > state_->manifest.chunks.size())
    return Status::InvalidArgument("first chunk " + std::to_string(first_chunk) +
                                   " beyond the export's " +
                                   std::to_string(state_->manifest.chunks.size()) + " chunks");
  return std::unique_ptr<DeltaSource>(new ExportRecords(state_, first_chunk));
}

}  // namespace vmreplica
