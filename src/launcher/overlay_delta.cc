// OverlayDeltaSource: the extents a qcow2 overlay holds itself.
//
// `qemu-img map --output=json 'json:{"driver":"qcow2","file":{...},"backing":null}'`
// answers, with the backing detached, one object per run of the disk:
//   {"start","length","depth":0,"present","zero","data"[,"offset"]}
// present=false: the overlay holds nothing there (reads would fall through);
// present and zero: the overlay holds zeros there (zero clusters, discards);
// present and data: the bytes sit at "offset" in the overlay file.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "launcher/subprocess.h"
#include "vmreplica/vm_launcher.h"

namespace vmreplica {
namespace {

constexpr uint64_t kMaxZeroRecordBytes = 1ull << 30;
constexpr uint64_t kMaxDiskBytes = 1ull << 62;
// About 2.5 million extents of qemu-img map JSON.
constexpr size_t kMaxMapOutputBytes = 256u << 20;

}  // namespace

OverlayDeltaSource::OverlayDeltaSource(std::vector<std::string> overlays, OverlayDeltaOptions options)
    : overlays_(std::move(overlays)), options_(std::move(options)) {}

OverlayDeltaSource::~OverlayDeltaSource() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::unique_ptr<OverlayDeltaSource>> OverlayDeltaSource::Open(std::vector<std::string> overlays,
                                                                     OverlayDeltaOptions options) {
  if (options.max_record_bytes < 4096 || options.max_record_bytes > (64u << 20)) {
    return Status::InvalidArgument("max_record_bytes: 4 KiB .. 64 MiB");
  }
  for (size_t i = 0; i < overlays.size(); ++i) {
    if (overlays[i].empty() || launcher_internal::HasControlChars(overlays[i])) {
      return Status::InvalidArgument("overlays[" + std::to_string(i) + "]: bad path");
    }
  }
  std::unique_ptr<OverlayDeltaSource> s(new OverlayDeltaSource(std::move(overlays), std::move(options)));
  // The first map now, so a locked or broken overlay fails Open.
  if (!s->overlays_.empty()) VMR_RETURN_IF_ERROR(s->LoadDisk(0));
  return s;
}

Status OverlayDeltaSource::LoadDisk(size_t disk) {
  const std::string& path = overlays_[disk];
  const std::string f = "overlay " + path + ": ";
  if (fd_ >= 0) ::close(fd_);
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) {
    int err = errno;
    if (err == ENOENT) return Status::NotFound(f + "no such file");
    return Status::IOError(f + "open: " + std::strerror(err));
  }
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return Status::IOError(f + "fstat: " + std::strerror(errno));
  file_size_ = static_cast<uint64_t>(st.st_size);

  const nlohmann::json opts = {
      {"driver", "qcow2"}, {"file", {{"driver", "file"}, {"filename", path}}}, {"backing", nullptr}};
  VMR_ASSIGN_OR_RETURN(
      auto c, launcher_internal::RunCapture({options_.qemu_img_binary, "map", "--output=json", "json:" + opts.dump()},
                                            kMaxMapOutputBytes));
  if (c.exit_code == 127) return Status::FailedPrecondition("qemu-img is not installed (package qemu-utils)");
  if (c.exit_code != 0) {
    if (c.output.find("lock") != std::string::npos) {
      return Status::FailedPrecondition(f + "in use by a running QEMU: " + c.output);
    }
    return Status::IOError(f + "qemu-img map failed: " + c.output);
  }
  if (c.truncated) {
    return Status::NotSupported(f +
                                "qemu-img map answered more than 256 MiB (an overlay this fragmented is not "
                                "supported)");
  }
  nlohmann::json map = nlohmann::json::parse(c.output, nullptr, /*allow_exceptions=*/false);
  if (!map.is_array()) return Status::Corruption(f + "qemu-img map did not answer a JSON array");

  extents_.clear();
  extent_ = 0;
  extent_done_ = 0;
  uint64_t expect = 0;
  for (size_t i = 0; i < map.size(); ++i) {
    const nlohmann::json& e = map[i];
    const std::string ef = f + "map[" + std::to_string(i) + "].";
    if (!e.is_object()) return Status::Corruption(ef + ": not an object");
    for (const char* k : {"start", "length", "depth"}) {
      if (!e.contains(k) || !e[k].is_number_unsigned()) return Status::Corruption(ef + k + ": unsigned expected");
    }
    for (const char* k : {"present", "zero", "data"}) {
      if (!e.contains(k) || !e[k].is_boolean()) return Status::Corruption(ef + k + ": boolean expected");
    }
    const uint64_t start = e["start"].get<uint64_t>();
    const uint64_t length = e["length"].get<uint64_t>();
    if (start != expect)
      return Status::Corruption(ef + "start: " + std::to_string(start) + ", expected " + std::to_string(expect));
    if (length == 0 || length > kMaxDiskBytes || start > kMaxDiskBytes - length) {
      return Status::Corruption(ef + "length out of range");
    }
    expect = start + length;
    if (e["depth"].get<uint64_t>() != 0) return Status::Corruption(ef + "depth: 0 expected with no backing");
    if (!e["present"].get<bool>()) continue;
    Extent x;
    x.start = start;
    x.length = length;
    if (e["zero"].get<bool>()) {
      x.zero = true;
    } else if (e["data"].get<bool>()) {
      if (!e.contains("offset")) {
        return Status::NotSupported(ef + "data not readable in place (compressed or encrypted cluster)");
      }
      if (!e["offset"].is_number_unsigned()) return Status::Corruption(ef + "offset: unsigned expected");
      x.file_offset = e["offset"].get<uint64_t>();
      if (x.file_offset > file_size_ || length > file_size_ - x.file_offset) {
        return Status::Corruption(ef + "offset: data beyond the end of the file");
      }
    } else {
      return Status::Corruption(ef + "present but neither zero nor data");
    }
    // qemu-img merges runs itself; merge what it left adjacent anyway.
    if (!extents_.empty()) {
      Extent& prev = extents_.back();
      bool adjacent = prev.start + prev.length == x.start && prev.zero == x.zero &&
                      (x.zero || prev.file_offset + prev.length == x.file_offset);
      if (adjacent) {
        prev.length += x.length;
        continue;
      }
    }
    extents_.push_back(x);
  }
  disk_ = disk;
  loaded_ = true;
  return Status::Ok();
}

Result<std::optional<DeltaRecord>> OverlayDeltaSource::Next() {
  for (;;) {
    if (disk_ >= overlays_.size()) return std::optional<DeltaRecord>();
    if (!loaded_) VMR_RETURN_IF_ERROR(LoadDisk(disk_));
    if (extent_ >= extents_.size()) {
      if (fd_ >= 0) ::close(fd_);
      fd_ = -1;
      loaded_ = false;
      ++disk_;
      continue;
    }
    const Extent& e = extents_[extent_];
    const uint64_t offset = e.start + extent_done_;
    const uint64_t left = e.length - extent_done_;
    const uint32_t disk = static_cast<uint32_t>(disk_);
    if (e.zero) {
      const uint64_t n = std::min(left, kMaxZeroRecordBytes);
      extent_done_ += n;
      if (extent_done_ == e.length) {
        ++extent_;
        extent_done_ = 0;
      }
      stats_.zero_bytes += n;
      stats_.zero_records += 1;
      return std::optional<DeltaRecord>(ZeroRecord(disk, offset, n));
    }
    const uint64_t n = std::min(left, options_.max_record_bytes);
    std::string bytes(n, '\0');
    uint64_t got = 0;
    while (got < n) {
      ssize_t r = ::pread(fd_, bytes.data() + got, n - got, static_cast<off_t>(e.file_offset + extent_done_ + got));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return Status::IOError("overlay " + overlays_[disk_] + ": pread: " + std::strerror(errno));
      if (r == 0) return Status::Corruption("overlay " + overlays_[disk_] + ": file shorter than its map");
      got += static_cast<uint64_t>(r);
    }
    extent_done_ += n;
    if (extent_done_ == e.length) {
      ++extent_;
      extent_done_ = 0;
    }
    stats_.data_bytes += n;
    stats_.data_records += 1;
    return std::optional<DeltaRecord>(DataRecord(disk, offset, std::move(bytes)));
  }
}

}  // namespace vmreplica
