// The old primary's side of a reverse: see old_primary.h and
// docs/failover.md sections 11 and 14.1.
#include "failover/old_primary.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>

#include "launcher/subprocess.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/nbd_reader.h"
#include "vmreplica/reverse.h"
#include "vmreplica/tracker.h"

namespace vmreplica {
namespace {

using launcher_internal::HasControlChars;
using launcher_internal::RunCapture;

constexpr uint64_t kRoundedSizeUnit = kReplicaBlockSize;  // the store's disks are rounded to it (section 11)
constexpr size_t kMaxInfoBytes = 1u << 20;    // qemu-img info's JSON

Status ErrnoStatus(const std::string& what) { return Status::IOError(what + ": " + std::strerror(errno)); }

bool ValidDiskName(const std::string& n) {
  if (n.empty() || n.size() > 26) return false;
  if (!((n[0] >= 'A' && n[0] <= 'Z') || (n[0] >= 'a' && n[0] <= 'z'))) return false;
  return std::all_of(n.begin(), n.end(), [](char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
  });
}

// A qemu-img failure that says another process holds the image.
bool IsLockFailure(const std::string& output) {
  return output.find("lock") != std::string::npos && output.find("Failed to get") != std::string::npos;
}

// Runs qemu-img; FailedPrecondition when it is not installed or the image is
// locked by another process, IOError with its output otherwise.
Result<std::string> QemuImg(const std::string& qemu_img, const std::string& image, std::vector<std::string> args) {
  args.insert(args.begin(), qemu_img);
  VMR_ASSIGN_OR_RETURN(auto c, RunCapture(args, kMaxInfoBytes));
  if (c.exit_code == 127) return Status::FailedPrecondition(qemu_img + " is not installed (package qemu-utils)");
  if (c.exit_code != 0 || c.truncated) {
    if (IsLockFailure(c.output)) {
      return Status::FailedPrecondition("image " + image + " is in use by another process (" + c.output + ")");
    }
    std::string cmd;
    for (const auto& a : args) cmd += (cmd.empty() ? "" : " ") + a;
    return Status::IOError(cmd + " failed (exit " + std::to_string(c.exit_code) + "): " + c.output);
  }
  return c.output;
}

// What qemu-img info tells about the source image.
struct ImageInfo {
  uint64_t virtual_size = 0;
  std::string data_file;       // qcow2 with an external data file; "" otherwise
  bool data_file_raw = false;  // that data file is a valid raw image by itself
};

Result<ImageInfo> InspectImage(const VmDiskSpec& disk, const std::string& qemu_img) {
  // The format is given (-f): a raw image whose content looks like another
  // format is not probed. No -U: the shared lock proves no QEMU writes it.
  VMR_ASSIGN_OR_RETURN(std::string out,
                       QemuImg(qemu_img, disk.path, {"info", "-f", disk.format, "--output=json", disk.path}));
  const nlohmann::json j = nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("virtual-size") || !j["virtual-size"].is_number_unsigned()) {
    return Status::IOError("qemu-img info of " + disk.path + " answered no virtual size");
  }
  ImageInfo info;
  info.virtual_size = j["virtual-size"].get<uint64_t>();
  if (j.contains("format-specific") && j["format-specific"].is_object() && j["format-specific"].contains("data") &&
      j["format-specific"]["data"].is_object()) {
    const nlohmann::json& d = j["format-specific"]["data"];
    if (d.contains("data-file") && d["data-file"].is_string()) {
      info.data_file = d["data-file"].get<std::string>();
      // A relative data file name is relative to the image's directory.
      if (!info.data_file.empty() && info.data_file[0] != '/') {
        info.data_file = disk.path.substr(0, disk.path.rfind('/') + 1) + info.data_file;
      }
    }
    info.data_file_raw =
        d.contains("data-file-raw") && d["data-file-raw"].is_boolean() && d["data-file-raw"].get<bool>();
  }
  return info;
}

// Both paths name the same existing file (same string, or same inode).
bool SameFile(const std::string& a, const std::string& b) {
  if (a == b) return true;
  struct stat sa {};
  struct stat sb {};
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return false;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// Bytes in the SEEK_DATA extents of an open file of `size` bytes (a file
// system without SEEK_DATA counts the whole file).
Result<uint64_t> DataBytes(int fd, uint64_t size, const std::string& path) {
  uint64_t total = 0;
  off_t pos = 0;
  while (static_cast<uint64_t>(pos) < size) {
    const off_t data = ::lseek(fd, pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // no data after pos
      if (errno == EINVAL) return size - static_cast<uint64_t>(pos) + total;
      return ErrnoStatus("lseek SEEK_DATA " + path);
    }
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0) return ErrnoStatus("lseek SEEK_HOLE " + path);
    if (static_cast<uint64_t>(hole) > size) hole = static_cast<off_t>(size);
    if (hole <= data) break;
    total += static_cast<uint64_t>(hole - data);
    pos = hole;
  }
  return total;
}

Status CheckInPlaceFile(const std::string& target, uint64_t rounded_size) {
  struct stat st {};
  if (::stat(target.c_str(), &st) != 0) return ErrnoStatus("stat " + target);
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument(target + " is not a regular file");
  if (static_cast<uint64_t>(st.st_size) != rounded_size) {
    return Status::InvalidArgument(target + " is " + std::to_string(st.st_size) + " bytes; the store needs " +
                                   std::to_string(rounded_size));
  }
  return Status::Ok();
}

// Rounds `v` up to a multiple of 4096 (no overflow for disk sizes).
uint64_t RoundUp4k(uint64_t v) { return (v + kRangeListAlign - 1) / kRangeListAlign * kRangeListAlign; }

bool IsResyncRequired(const Status& s) {
  return s.code() == Code::kFailedPrecondition && s.message().find("resynchronization required") != std::string::npos;
}

}  // namespace

Result<PlacedDisk> PlaceAdoptedDisk(const VmDiskSpec& disk, const std::string& store_dir, uint64_t rounded_size,
                                    const std::string& qemu_img) {
  if (!ValidDiskName(disk.name)) {
    return Status::InvalidArgument("disk name \"" + disk.name + "\" must match [A-Za-z][A-Za-z0-9_]{0,25}");
  }
  if (disk.path.size() < 2 || disk.path[0] != '/' || HasControlChars(disk.path)) {
    return Status::InvalidArgument("disk " + disk.name + ": an absolute image path is required: " + disk.path);
  }
  if (disk.format != "qcow2" && disk.format != "raw") {
    return Status::InvalidArgument("disk " + disk.name + ": format \"" + disk.format + "\" is not qcow2 or raw");
  }
  if (rounded_size == 0 || rounded_size % kRoundedSizeUnit != 0) {
    return Status::InvalidArgument("disk " + disk.name + ": the rounded size " + std::to_string(rounded_size) +
                                   " is not a positive multiple of " + std::to_string(kRoundedSizeUnit));
  }
  if (disk.size_bytes == 0 || disk.size_bytes > rounded_size) {
    return Status::InvalidArgument("disk " + disk.name + ": size " + std::to_string(disk.size_bytes) +
                                   " is not in 1.." + std::to_string(rounded_size));
  }
  if (store_dir.size() < 2 || store_dir[0] != '/' || HasControlChars(store_dir)) {
    return Status::InvalidArgument("store directory: an absolute path is required: " + store_dir);
  }
  struct stat st {};
  if (::stat(disk.path.c_str(), &st) != 0) {
    return Status::InvalidArgument("disk " + disk.name + ": image " + disk.path + ": " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    return Status::InvalidArgument("disk " + disk.name + ": image " + disk.path + " is not a file or block device");
  }
  VMR_ASSIGN_OR_RETURN(ImageInfo info, InspectImage(disk, qemu_img));
  if (info.virtual_size != disk.size_bytes) {
    return Status::InvalidArgument("disk " + disk.name + ": image " + disk.path + " has " +
                                   std::to_string(info.virtual_size) + " virtual bytes, defined as " +
                                   std::to_string(disk.size_bytes));
  }

  const std::string dir = store_dir + "/disks";
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno != ENOENT) return ErrnoStatus("stat " + dir);
    VMR_RETURN_IF_ERROR(MakeDirs(dir, 0700));
  } else if (!S_ISDIR(st.st_mode)) {
    return Status::InvalidArgument(dir + " is not a directory");
  }
  const std::string target = dir + "/" + disk.name + ".img";

  // In place: a wrapper of ours over the target (the round trip), or the
  // target file itself.
  const bool wrapper_of_target = !info.data_file.empty() && SameFile(info.data_file, target);
  if (wrapper_of_target || (disk.format == "raw" && SameFile(disk.path, target))) {
    if (wrapper_of_target && !info.data_file_raw) {
      return Status::InvalidArgument("disk " + disk.name + ": " + disk.path + " has data file " + target +
                                     " without data-file-raw: the file alone is not the disk");
    }
    VMR_RETURN_IF_ERROR(CheckInPlaceFile(target, rounded_size));
    spdlog::info("disk {}: {} already holds the content of {}: nothing copied", disk.name, target, disk.path);
    return PlacedDisk{0, true};
  }

  const std::string part = target + ".part";
  int fd = ::open(part.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return ErrnoStatus("create " + part);
  if (::ftruncate(fd, static_cast<off_t>(rounded_size)) != 0) {
    Status s = ErrnoStatus("ftruncate " + part);
    ::close(fd);
    ::unlink(part.c_str());
    return s;
  }
  auto fail = [&](Status s) -> Status {
    ::close(fd);
    ::unlink(part.c_str());
    return s;
  };
  auto copied = QemuImg(qemu_img, disk.path,
                        {"convert", "-n", "--target-is-zero", "-f", disk.format, "-O", "raw", disk.path, part});
  if (!copied.ok()) return fail(copied.status());
  if (::fdatasync(fd) != 0) return fail(ErrnoStatus("fdatasync " + part));
  if (::fstat(fd, &st) != 0) return fail(ErrnoStatus("fstat " + part));
  if (static_cast<uint64_t>(st.st_size) != rounded_size) {
    return fail(Status::IOError(part + " is " + std::to_string(st.st_size) + " bytes after the copy, expected " +
                                std::to_string(rounded_size)));
  }
  auto data = DataBytes(fd, rounded_size, part);
  if (!data.ok()) return fail(data.status());
  ::close(fd);
  if (::rename(part.c_str(), target.c_str()) != 0) {
    Status s = ErrnoStatus("rename " + part + " to " + target);
    ::unlink(part.c_str());
    return s;
  }
  VMR_RETURN_IF_ERROR(FsyncParentDir(target));
  spdlog::info("disk {}: {} copied to {} ({} bytes of data)", disk.name, disk.path, target, *data);
  return PlacedDisk{*data, false};
}

std::vector<ReplicaRange> CoarsenRanges(std::vector<ReplicaRange> ranges, uint64_t max_entries) {
  for (uint64_t gap = 64 * 1024; ranges.size() > max_entries && gap != 0; gap <<= 1) {
    std::vector<ReplicaRange> out;
    out.reserve(ranges.size());
    for (const ReplicaRange& r : ranges) {
      if (!out.empty() && out.back().disk == r.disk && r.offset - (out.back().offset + out.back().length) < gap) {
        out.back().length = r.offset + r.length - out.back().offset;
      } else {
        out.push_back(r);
      }
    }
    ranges = std::move(out);
  }
  return ranges;
}

Result<OldPrimaryCandidates> InspectOldPrimary(const VmDefinition& def, const std::vector<VmDiskSpec>& included,
                                               const std::string& vm_id, const std::string& run_dir) {
  if (vm_id.empty()) return Status::InvalidArgument("InspectOldPrimary: empty relationship id");
  if (included.empty() || included.size() > kRangeListMaxDisks) {
    return Status::InvalidArgument("InspectOldPrimary: 1.." + std::to_string(kRangeListMaxDisks) +
                                   " included disks required, got " + std::to_string(included.size()));
  }
  for (size_t i = 0; i < included.size(); ++i) {
    for (size_t k = 0; k < i; ++k) {
      if (included[k].name == included[i].name) {
        return Status::InvalidArgument("InspectOldPrimary: disk " + included[i].name + " included twice");
      }
    }
    const bool known = std::any_of(def.disks.begin(), def.disks.end(),
                                   [&](const VmDiskSpec& d) { return d.name == included[i].name; });
    if (!known) {
      return Status::InvalidArgument("InspectOldPrimary: disk " + included[i].name + " is not a disk of VM " +
                                     def.name);
    }
  }

  // Declared before the tracker: the tracker borrows its QMP channel, and
  // the attach's end (after the tracker's) stops the qemu-storage-daemon
  // cleanly so that qcow2 bitmaps are stored consistent.
  VMR_ASSIGN_OR_RETURN(std::unique_ptr<AttachedVm> attached, AttachVmImages(def, run_dir));
  std::vector<TrackedDisk> tracked;
  for (const auto& d : included) {
    bool found = false;
    for (const auto& t : attached->tracked_disks()) {
      if (t.name == d.name) {
        tracked.push_back(t);
        found = true;
      }
    }
    if (!found) return Status::FailedPrecondition("disk " + d.name + " of VM " + vm_id + " is not attached");
  }
  TrackerOptions topt;
  topt.nbd_socket = attached->nbd_socket();
  ChangeTracker tracker(attached->qmp(), vm_id, tracked, topt);
  VMR_ASSIGN_OR_RETURN(auto reconciled, tracker.Reconcile());
  for (const auto& a : reconciled.actions) spdlog::info("VM {}: reconcile: {}", vm_id, a);

  OldPrimaryCandidates out;
  Status tracking = tracker.CheckTracking();
  if (tracking.ok()) {
    VMR_ASSIGN_OR_RETURN(Cut cut, tracker.TakeCut(attached->export_dir()));
    Status read = Status::Ok();
    if (cut.disks.size() != included.size()) {
      read = Status::Internal("the cut has " + std::to_string(cut.disks.size()) + " disks, expected " +
                              std::to_string(included.size()));
    }
    for (uint32_t i = 0; read.ok() && i < cut.disks.size(); ++i) {
      const CutDisk& cd = cut.disks[i];
      if (cd.disk != included[i].name) {
        read = Status::Internal("cut disk " + std::to_string(i) + " is " + cd.disk + ", expected " + included[i].name);
        break;
      }
      auto extents = NbdDirtyExtents(cd.socket_path, cd.export_name, cd.bitmap_context, i);
      if (!extents.ok()) {
        read = extents.status().WithContext("disk " + cd.disk);
        break;
      }
      for (ReplicaRange r : *extents) {
        const uint64_t end = RoundUp4k(r.offset + r.length);
        r.length = end - r.offset;
        if (!out.ranges.empty() && out.ranges.back().disk == r.disk &&
            out.ranges.back().offset + out.ranges.back().length >= r.offset) {
          // Defensive: NbdDirtyExtents answers coalesced extents.
          out.ranges.back().length =
              std::max(out.ranges.back().offset + out.ranges.back().length, end) - out.ranges.back().offset;
        } else {
          out.ranges.push_back(r);
        }
      }
    }
    // Nothing changes: g is merged back into g+1.
    Status aborted = tracker.Abort(cut);
    if (!read.ok()) {
      if (!aborted.ok())
        spdlog::error("VM {}: aborting the inspection's cut failed too: {}", vm_id, aborted.ToString());
      return read;
    }
    VMR_RETURN_IF_ERROR(aborted);
    out.tracking_intact = true;
  } else if (IsResyncRequired(tracking)) {
    spdlog::info("VM {}: tracking is lost ({}): every block is a candidate", vm_id, tracking.message());
    for (uint32_t i = 0; i < included.size(); ++i) {
      out.ranges.push_back(ReplicaRange{i, 0, RoundUp4k(tracked[i].size_bytes)});  // as attached
    }
  } else {
    return tracking;
  }
  out.ranges = CoarsenRanges(std::move(out.ranges), kRangeListMaxEntries);
  for (const ReplicaRange& r : out.ranges) out.candidate_bytes += r.length;
  return out;
}

Status WriteCandidatesFile(const std::string& path, uint32_t disk_count, const OldPrimaryCandidates& candidates) {
  SinceList list;
  list.entries.reserve(candidates.ranges.size());
  for (const ReplicaRange& r : candidates.ranges) list.entries.push_back(RangeEntry{r.disk, r.offset, r.length, 0});
  return WriteRangeListFile(path, kRangeListCandidates, disk_count, list);
}

}  // namespace vmreplica
