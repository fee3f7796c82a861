// MakeDiskWrapper: a qcow2 wrapper over a store's raw disk file with a
// persistent dirty bitmap (docs/failover.md section 10.2).
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "launcher/subprocess.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/vm_launcher.h"

namespace vmreplica {
namespace {

using launcher_internal::HasControlChars;
using launcher_internal::RunCapture;

constexpr uint32_t kWrapperGranularity = 4096;
constexpr size_t kMaxBitmapName = 1023;  // qcow2's limit
constexpr size_t kMaxInfoBytes = 1u << 20;

std::string Errno(const std::string& what) { return what + ": " + std::strerror(errno); }

// Absolute, no ',' (qemu-img's -o syntax) and no control characters.
Status CheckPath(const std::string& field, const std::string& path) {
  if (path.size() < 2 || path[0] != '/' || path.back() == '/')
    return Status::InvalidArgument(field + ": an absolute file path is required: " + path);
  if (path.find(',') != std::string::npos || HasControlChars(path))
    return Status::InvalidArgument(field + ": no ',' or control characters allowed: " + path);
  return Status::Ok();
}

// Runs qemu-img; FailedPrecondition when it is not installed, IOError with
// its output when it fails.
Result<std::string> QemuImg(const std::string& qemu_img, std::vector<std::string> args) {
  args.insert(args.begin(), qemu_img);
  VMR_ASSIGN_OR_RETURN(auto c, RunCapture(args, kMaxInfoBytes));
  if (c.exit_code == 127) return Status::FailedPrecondition(qemu_img + " is not installed (package qemu-utils)");
  if (c.exit_code != 0 || c.truncated) {
    std::string cmd;
    for (const auto& a : args) cmd += (cmd.empty() ? "" : " ") + a;
    return Status::IOError(cmd + " failed (exit " + std::to_string(c.exit_code) + "): " + c.output);
  }
  return c.output;
}

// What `qemu-img info` says about an existing file, as far as a wrapper goes.
// OK when it is a qcow2 of `size` bytes whose raw data file is `raw_path`
// and which carries `bitmap` with a 4 KiB granularity; AlreadyExists (naming
// the difference) otherwise. Shared lock (-U): a running VM may hold it.
Status CheckExistingWrapper(const std::string& wrapper_path, const std::string& raw_path, uint64_t size,
                            const std::string& bitmap, const std::string& qemu_img) {
  auto out = QemuImg(qemu_img, {"info", "-U", "--output=json", wrapper_path});
  if (!out.ok()) {
    if (out.status().code() == Code::kFailedPrecondition) return out.status();
    return Status::AlreadyExists(wrapper_path + " exists and qemu-img cannot read it: " + out.status().message());
  }
  auto differs = [&](const std::string& what) {
    return Status::AlreadyExists(wrapper_path + " exists and is not a wrapper of " + raw_path + " with bitmap " +
                                 bitmap + ": " + what + " (remove it to make a new one)");
  };
  const nlohmann::json j = nlohmann::json::parse(*out, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return differs("qemu-img info did not answer a JSON object");
  if (!j.contains("format") || j["format"] != "qcow2") return differs("not qcow2");
  if (!j.contains("virtual-size") || !j["virtual-size"].is_number_unsigned() ||
      j["virtual-size"].get<uint64_t>() != size)
    return differs("virtual size is not " + std::to_string(size));
  if (!j.contains("format-specific") || !j["format-specific"].is_object() || !j["format-specific"].contains("data") ||
      !j["format-specific"]["data"].is_object())
    return differs("no qcow2 details");
  const nlohmann::json& d = j["format-specific"]["data"];
  if (!d.contains("data-file") || d["data-file"] != raw_path) return differs("its data file is not " + raw_path);
  if (!d.contains("data-file-raw") || d["data-file-raw"] != true) return differs("data-file-raw is off");
  if (d.contains("corrupt") && d["corrupt"] == true) return differs("marked corrupt");
  // The tracker's later generations of the same bitmap (<prefix>g2, g3...,
  // after a committed cut) count as the wrapper's bitmap too.
  const bool generational = bitmap.size() > 2 && bitmap.compare(bitmap.size() - 2, 2, "g1") == 0;
  const std::string prefix = generational ? bitmap.substr(0, bitmap.size() - 1) : bitmap;
  auto matches = [&](const std::string& name) {
    if (name == bitmap) return true;
    if (!generational || name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) return false;
    return std::all_of(name.begin() + static_cast<std::ptrdiff_t>(prefix.size()), name.end(),
                       [](unsigned char c) { return std::isdigit(c); });
  };
  if (d.contains("bitmaps") && d["bitmaps"].is_array()) {
    for (const auto& b : d["bitmaps"]) {
      if (!b.is_object() || !b.contains("name") || !b["name"].is_string() || !matches(b["name"].get<std::string>())) {
        continue;
      }
      if (!b.contains("granularity") || b["granularity"] != kWrapperGranularity)
        return differs("bitmap granularity is not 4096");
      return Status::Ok();
    }
  }
  return differs("no bitmap " + bitmap);
}

Status FsyncFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Status::IOError(Errno("open " + path));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return Status::IOError("fsync " + path + ": " + std::strerror(err));
  return Status::Ok();
}

}  // namespace

Status MakeDiskWrapper(const std::string& raw_path, const std::string& wrapper_path, uint64_t size_bytes,
                       const std::string& bitmap_name, const std::string& qemu_img) {
  VMR_RETURN_IF_ERROR(CheckPath("raw_path", raw_path));
  VMR_RETURN_IF_ERROR(CheckPath("wrapper_path", wrapper_path));
  if (raw_path == wrapper_path) return Status::InvalidArgument("wrapper_path: the same file as raw_path");
  if (size_bytes == 0 || size_bytes % 512 != 0)
    return Status::InvalidArgument("size_bytes: a positive multiple of 512 is required");
  if (bitmap_name.empty() || bitmap_name.size() > kMaxBitmapName || HasControlChars(bitmap_name) ||
      bitmap_name[0] == '-')
    return Status::InvalidArgument("bitmap_name: 1..1023 bytes without control characters, not starting with '-'");
  if (qemu_img.empty()) return Status::InvalidArgument("qemu_img: empty");
  struct stat st {};
  if (::stat(raw_path.c_str(), &st) != 0) {
    if (errno == ENOENT) return Status::NotFound("raw_path: no such file: " + raw_path);
    return Status::IOError(Errno("stat " + raw_path));
  }
  if (!S_ISREG(st.st_mode)) return Status::InvalidArgument("raw_path: not a regular file: " + raw_path);
  if (static_cast<uint64_t>(st.st_size) != size_bytes)
    return Status::InvalidArgument("raw_path: " + raw_path + " has " + std::to_string(st.st_size) + " bytes, not " +
                                   std::to_string(size_bytes));
  const size_t slash = wrapper_path.rfind('/');
  const std::string dir = slash == 0 ? "/" : wrapper_path.substr(0, slash);
  std::string stem = wrapper_path.substr(slash + 1);
  if (stem.size() > 6 && stem.compare(stem.size() - 6, 6, ".qcow2") == 0) stem.resize(stem.size() - 6);
  struct stat dst {};
  if (::stat(dir.c_str(), &dst) != 0 || !S_ISDIR(dst.st_mode))
    return Status::InvalidArgument("wrapper_path: no directory " + dir);
  const std::string part = wrapper_path + ".part";
  const std::string scratch = (dir == "/" ? "" : dir) + "/." + stem + ".tmp";
  if (scratch == raw_path || part == raw_path)
    return Status::InvalidArgument("raw_path: collides with the wrapper's temporary files");

  struct stat wst {};
  if (::lstat(wrapper_path.c_str(), &wst) == 0) {
    VMR_RETURN_IF_ERROR(CheckExistingWrapper(wrapper_path, raw_path, size_bytes, bitmap_name, qemu_img));
    spdlog::debug("disk wrapper {} of {} exists", wrapper_path, raw_path);
    return Status::Ok();
  }
  // Leftovers of an interrupted attempt.
  for (const std::string& f : {part, scratch}) {
    if (::unlink(f.c_str()) != 0 && errno != ENOENT) return Status::IOError(Errno("unlink " + f));
  }
  struct Cleanup {
    std::vector<std::string> files;
    bool armed = true;
    ~Cleanup() {
      if (!armed) return;
      for (const auto& f : files) ::unlink(f.c_str());
    }
  } cleanup{{part, scratch}};

  // Created over a scratch data file (naming the store's file here would
  // truncate it), then pointed at the real one.
  const std::string size = std::to_string(size_bytes);
  VMR_RETURN_IF_ERROR(
      QemuImg(qemu_img,
              {"create", "-q", "-f", "qcow2", "-o",
               "data_file=" + scratch + ",data_file_raw=on,preallocation=metadata,cluster_size=1M", part, size})
          .status());
  VMR_RETURN_IF_ERROR(QemuImg(qemu_img, {"amend", "-f", "qcow2", "-o", "data_file=" + raw_path, part}).status());
  if (::unlink(scratch.c_str()) != 0) return Status::IOError(Errno("unlink " + scratch));
  VMR_RETURN_IF_ERROR(
      QemuImg(qemu_img, {"bitmap", "--add", "--granularity", std::to_string(kWrapperGranularity), part, bitmap_name})
          .status());
  // The header says what was asked for (data file, raw, size, bitmap).
  if (Status check = CheckExistingWrapper(part, raw_path, size_bytes, bitmap_name, qemu_img); !check.ok())
    return Status::IOError("the new wrapper is not as made: " + check.message());
  VMR_RETURN_IF_ERROR(FsyncFile(part));
  if (::rename(part.c_str(), wrapper_path.c_str()) != 0) return Status::IOError(Errno("rename " + part));
  cleanup.armed = false;
  VMR_RETURN_IF_ERROR(FsyncParentDir(wrapper_path));
  struct stat after {};
  if (::stat(raw_path.c_str(), &after) != 0 || static_cast<uint64_t>(after.st_size) != size_bytes)
    return Status::Internal("raw_path: " + raw_path + " changed size while its wrapper was made");
  spdlog::info("disk wrapper {} made over {} ({} bytes, bitmap {})", wrapper_path, raw_path, size_bytes, bitmap_name);
  return Status::Ok();
}

}  // namespace vmreplica
