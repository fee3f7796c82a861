#include "exportimport/export_format.h"

#include <xxhash.h>

#include <cstdio>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <set>

namespace vmreplica::exportimport {
namespace {

using Json = nlohmann::json;

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

bool IsHex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

char Lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

// Strict UTF-8 (no overlong forms, no surrogates, at most U+10FFFF).
bool ValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      n = 1;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (s.size() - i <= n) return false;  // the sequence is cut off
    for (size_t k = 1; k <= n; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (d & 0x3f);
    }
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
        cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += n + 1;
  }
  return true;
}

bool ValidDiskName(std::string_view n) {
  if (n.empty() || n.size() > kMaxDiskNameBytes || n[0] == '.') return false;
  for (char c : n) {
    const bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

// ---- JSON access with precise errors

Status CheckKeys(const Json& j, std::initializer_list<const char*> keys, const std::string& what) {
  if (!j.is_object()) return Status::InvalidArgument(what + " is not a JSON object");
  for (const char* k : keys)
    if (!j.contains(k)) return Status::InvalidArgument(what + " has no \"" + k + "\"");
  if (j.size() != keys.size()) {
    for (auto it = j.begin(); it != j.end(); ++it) {
      bool known = false;
      for (const char* k : keys) known = known || it.key() == k;
      if (!known) return Status::InvalidArgument(what + " has unknown key \"" + it.key() + "\"");
    }
  }
  return Status::Ok();
}

Result<std::string> GetString(const Json& j, const char* key, const std::string& what) {
  const Json& v = j.at(key);
  if (!v.is_string()) return Status::InvalidArgument(what + ": \"" + key + "\" is not a string");
  return v.get<std::string>();
}

Result<uint64_t> GetUint(const Json& j, const char* key, const std::string& what,
                         uint64_t max = kMaxDiskSize) {
  const Json& v = j.at(key);
  if (!v.is_number_unsigned())
    return Status::InvalidArgument(what + ": \"" + key + "\" is not a non-negative integer");
  const uint64_t x = v.get<uint64_t>();
  if (x > max)
    return Status::InvalidArgument(what + ": \"" + key + "\" " + std::to_string(x) + " exceeds " +
                                   std::to_string(max));
  return x;
}

std::string Hex128(const XXH128_hash_t& h) {
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(h.high64),
                static_cast<unsigned long long>(h.low64));
  return std::string(buf, 32);
}

Result<ExportChunk> DecodeChunk(const Json& j, size_t i) {
  const std::string what = "chunk " + std::to_string(i);
  VMR_RETURN_IF_ERROR(CheckKeys(j,
                                {"kind", "disk", "offset", "length", "compression", "stored_length",
                                 "xxh3_128", "file", "file_offset"},
                                what));
  ExportChunk c;
  VMR_ASSIGN_OR_RETURN(std::string kind, GetString(j, "kind", what));
  VMR_ASSIGN_OR_RETURN(uint64_t disk, GetUint(j, "disk", what, kMaxDisks - 1));
  c.disk = static_cast<uint32_t>(disk);
  VMR_ASSIGN_OR_RETURN(c.offset, GetUint(j, "offset", what));
  VMR_ASSIGN_OR_RETURN(c.length, GetUint(j, "length", what));
  VMR_ASSIGN_OR_RETURN(std::string compression, GetString(j, "compression", what));
  VMR_ASSIGN_OR_RETURN(c.stored_length, GetUint(j, "stored_length", what));
  VMR_ASSIGN_OR_RETURN(std::string hash, GetString(j, "xxh3_128", what));
  VMR_ASSIGN_OR_RETURN(std::string file, GetString(j, "file", what));
  VMR_ASSIGN_OR_RETURN(c.file_offset, GetUint(j, "file_offset", what));
  if (kind == "zero") {
    c.zero = true;
    if (compression != "none" || c.stored_length != 0 || !hash.empty() || !file.empty() ||
        c.file_offset != 0)
      return Status::InvalidArgument(what + ": a zero chunk with stored data fields");
    return c;
  }
  if (kind != "data") return Status::InvalidArgument(what + ": unknown kind \"" + kind + "\"");
  if (compression == "zstd") {
    c.zstd = true;
  } else if (compression != "none") {
    return Status::InvalidArgument(what + ": unknown compression \"" + compression + "\"");
  }
  auto h = HashFromHex(hash);
  if (!h.ok()) return Status::InvalidArgument(what + ": xxh3_128 " + h.status().message());
  c.hash = *h;
  // The name is checked before it is ever used as a path: exactly
  // data-NNNNNN.bin, so never '/', '..' or anything outside the directory.
  if (!IsDataFileName(file))
    return Status::InvalidArgument(what + ": file name \"" + file +
                                   "\" is not a data file name (data-NNNNNN.bin)");
  c.file_index = static_cast<uint32_t>(std::stoul(file.substr(5, 6)));
  return c;
}

}  // namespace

std::string DataFileName(uint32_t index) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "data-%06u.bin", index);
  return buf;
}

bool IsDataFileName(std::string_view name) {
  if (name.size() != 15 || name.substr(0, 5) != "data-" || name.substr(11) != ".bin") return false;
  for (char c : name.substr(5, 6))
    if (c < '0' || c > '9') return false;
  return true;
}

Result<std::string> NormalizeUuid(std::string_view id) {
  if (id.size() != 36)
    return Status::InvalidArgument("VM id \"" + std::string(id) + "\" is not a UUID");
  std::string out(id);
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = Lower(out[i]);
    const bool dash = i == 8 || i == 13 || i == 18 || i == 23;
    if (dash ? out[i] != '-' : !IsHex(out[i]))
      return Status::InvalidArgument("VM id \"" + std::string(id) + "\" is not a UUID");
  }
  return out;
}

Result<ExportInfo> NormalizeInfo(const ExportInfo& info) {
  ExportInfo out = info;
  VMR_ASSIGN_OR_RETURN(out.vm_id, NormalizeUuid(info.vm_id));
  if (info.vm_name.empty() || info.vm_name.size() > kMaxVmNameBytes)
    return Status::InvalidArgument("VM name must be 1.." + std::to_string(kMaxVmNameBytes) +
                                   " bytes");
  for (char ch : info.vm_name) {
    const auto c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7f || c == '/')
      return Status::InvalidArgument("VM name \"" + info.vm_name +
                                     "\" contains '/' or a control character");
  }
  if (!ValidUtf8(info.vm_name)) return Status::InvalidArgument("VM name is not valid UTF-8");
  if (info.definition.size() > kMaxDefinitionBytes)
    return Status::InvalidArgument("VM definition larger than 16 MiB");
  if (!ValidUtf8(info.definition))
    return Status::InvalidArgument("VM definition is not valid UTF-8");
  if (info.generation_id.size() != 32)
    return Status::InvalidArgument("generation id \"" + info.generation_id +
                                   "\" is not 32 hex digits");
  for (char& c : out.generation_id) {
    c = Lower(c);
    if (!IsHex(c))
      return Status::InvalidArgument("generation id \"" + info.generation_id +
                                     "\" is not 32 hex digits");
  }
  if (info.cut_time_unix_ms < 0) return Status::InvalidArgument("negative cut time");
  if (info.disks.empty() || info.disks.size() > kMaxDisks)
    return Status::InvalidArgument("an export holds 1..64 disks, not " +
                                   std::to_string(info.disks.size()));
  std::set<std::string> names;
  uint64_t total = 0;
  for (const ExportDisk& d : info.disks) {
    if (!ValidDiskName(d.name))
      return Status::InvalidArgument("disk name \"" + d.name +
                                     "\" is not 1..255 of [A-Za-z0-9._-] (not starting with .)");
    if (!names.insert(d.name).second)
      return Status::InvalidArgument("disk name \"" + d.name + "\" appears twice");
    if (d.size == 0 || d.size > kMaxDiskSize)
      return Status::InvalidArgument("disk " + d.name + ": size " + std::to_string(d.size) +
                                     " outside [1, 2^62]");
    total += d.size;
    if (total > kMaxDiskSize)
      return Status::InvalidArgument("the disks add up to more than 2^62 bytes");
  }
  return out;
}

std::string ChunkName(const Manifest& m, size_t i) {
  std::string s = "chunk " + std::to_string(i);
  if (i < m.chunks.size() && m.chunks[i].disk < m.info.disks.size())
    s += " of disk " + m.info.disks[m.chunks[i].disk].name;
  return s;
}

Status ValidateManifest(const Manifest& m) {
  VMR_RETURN_IF_ERROR(NormalizeInfo(m.info).status());
  if (!IsPowerOfTwo(m.chunk_size) || m.chunk_size < kMinChunkSize || m.chunk_size > kMaxChunkSize)
    return Status::InvalidArgument("chunk size " + std::to_string(m.chunk_size) +
                                   " is not a power of two in [64 KiB, 64 MiB]");
  if (m.chunks.empty() || m.chunks.size() > kMaxChunks)
    return Status::InvalidArgument("chunk count " + std::to_string(m.chunks.size()) +
                                   " outside [1, 2^20]");
  if (m.file_sizes.size() > kMaxFiles)
    return Status::InvalidArgument("more than " + std::to_string(kMaxFiles) + " data files");
  for (size_t f = 0; f < m.file_sizes.size(); ++f)
    if (m.file_sizes[f] == 0 || m.file_sizes[f] > kMaxDiskSize)
      return Status::InvalidArgument("data file " + DataFileName(static_cast<uint32_t>(f)) +
                                     ": size " + std::to_string(m.file_sizes[f]) + " not allowed");

  ExportTotals sum;
  uint32_t disk = 0;
  uint64_t pos = 0;
  bool have_file = false;
  uint32_t file = 0;
  uint64_t file_pos = 0;
  const auto& disks = m.info.disks;
  for (size_t i = 0; i < m.chunks.size(); ++i) {
    const ExportChunk& c = m.chunks[i];
    if (c.disk >= disks.size())
      return Status::InvalidArgument("chunk " + std::to_string(i) + ": disk index " +
                                     std::to_string(c.disk) + " out of range");
    const std::string name = ChunkName(m, i);
    if (c.disk != disk) {
      if (c.disk != disk + 1)
        return Status::InvalidArgument(name + ": disks out of order (after disk " +
                                       disks[disk].name + ")");
      if (pos != disks[disk].size)
        return Status::InvalidArgument("disk " + disks[disk].name + ": chunks end at " +
                                       std::to_string(pos) + ", the disk has " +
                                       std::to_string(disks[disk].size) + " bytes");
      disk = c.disk;
      pos = 0;
    }
    if (c.length == 0) return Status::InvalidArgument(name + ": length 0");
    if (c.offset != pos)
      return Status::InvalidArgument(
          name + ": starts at " + std::to_string(c.offset) + ", expected " + std::to_string(pos) +
          (c.offset < pos ? " (overlaps the previous chunk)" : " (gap after the previous chunk)"));
    // offset, length <= 2^62 each: no overflow.
    if (c.offset + c.length > disks[disk].size)
      return Status::InvalidArgument(name + ": ends at " + std::to_string(c.offset + c.length) +
                                     ", beyond the disk size " + std::to_string(disks[disk].size));
    pos = c.offset + c.length;
    if (c.zero) {
      if (c.zstd || c.stored_length != 0 || c.file_offset != 0)
        return Status::InvalidArgument(name + ": a zero chunk with stored data");
      sum.zero_bytes += c.length;
      ++sum.zero_chunks;
      continue;
    }
    if (c.offset / m.chunk_size != (c.offset + c.length - 1) / m.chunk_size)
      return Status::InvalidArgument(name + ": crosses a " + std::to_string(m.chunk_size) +
                                     "-byte window boundary");
    if (c.zstd ? (c.stored_length == 0 || c.stored_length >= c.length)
               : c.stored_length != c.length)
      return Status::InvalidArgument(name + ": stored length " + std::to_string(c.stored_length) +
                                     " does not fit length " + std::to_string(c.length) +
                                     (c.zstd ? " (zstd)" : " (uncompressed)"));
    if (have_file && c.file_index == file && c.file_offset == file_pos) {
      // next in the same file
    } else if (c.file_index == (have_file ? file + 1 : 0) && c.file_offset == 0) {
      if (have_file && file_pos != m.file_sizes[file])
        return Status::InvalidArgument("data file " + DataFileName(file) + " has " +
                                       std::to_string(m.file_sizes[file] - file_pos) +
                                       " bytes after its last chunk");
      if (c.file_index >= m.file_sizes.size())
        return Status::InvalidArgument(name + ": data file " + DataFileName(c.file_index) +
                                       " is not listed");
      have_file = true;
      file = c.file_index;
      file_pos = 0;
    } else {
      return Status::InvalidArgument(
          name + ": stored at " + DataFileName(c.file_index) + " offset " +
          std::to_string(c.file_offset) + ", expected " +
          (have_file ? DataFileName(file) + " offset " + std::to_string(file_pos)
                     : DataFileName(0) + " offset 0") +
          " (stored chunks overlap or leave gaps)");
    }
    if (c.stored_length > m.file_sizes[file] - file_pos)
      return Status::InvalidArgument(name + ": runs past the end of data file " +
                                     DataFileName(file));
    file_pos += c.stored_length;
    sum.data_bytes += c.length;
    sum.stored_bytes += c.stored_length;
    ++sum.data_chunks;
  }
  if (disk + 1 != disks.size())
    return Status::InvalidArgument("disk " + disks[disk + 1].name + " has no chunks");
  if (pos != disks[disk].size)
    return Status::InvalidArgument("disk " + disks[disk].name + ": chunks end at " +
                                   std::to_string(pos) + ", the disk has " +
                                   std::to_string(disks[disk].size) + " bytes");
  if (have_file ? (file + 1 != m.file_sizes.size() || file_pos != m.file_sizes[file])
                : !m.file_sizes.empty())
    return Status::InvalidArgument("data files listed but not (fully) used by chunks");
  const ExportTotals& t = m.totals;
  if (t.data_bytes != sum.data_bytes || t.stored_bytes != sum.stored_bytes ||
      t.zero_bytes != sum.zero_bytes || t.data_chunks != sum.data_chunks ||
      t.zero_chunks != sum.zero_chunks)
    return Status::InvalidArgument("totals do not match the chunks");
  return Status::Ok();
}

Result<std::string> EncodeManifest(const Manifest& m) {
  Json body = Json::object();
  body["format"] = kFormatName;
  body["version"] = kFormatVersion;
  body["vm_id"] = m.info.vm_id;
  body["vm_name"] = m.info.vm_name;
  body["definition"] = m.info.definition;
  body["generation_id"] = m.info.generation_id;
  body["cut_time_unix_ms"] = static_cast<uint64_t>(m.info.cut_time_unix_ms);
  body["chunk_size"] = m.chunk_size;
  Json disks = Json::array();
  for (const ExportDisk& d : m.info.disks) disks.push_back({{"name", d.name}, {"size", d.size}});
  body["disks"] = std::move(disks);
  Json files = Json::array();
  for (size_t f = 0; f < m.file_sizes.size(); ++f)
    files.push_back({{"name", DataFileName(static_cast<uint32_t>(f))}, {"size", m.file_sizes[f]}});
  body["files"] = std::move(files);
  Json chunks = Json::array();
  for (const ExportChunk& c : m.chunks) {
    Json j = Json::object();
    j["kind"] = c.zero ? "zero" : "data";
    j["disk"] = c.disk;
    j["offset"] = c.offset;
    j["length"] = c.length;
    j["compression"] = c.zstd ? "zstd" : "none";
    j["stored_length"] = c.stored_length;
    j["xxh3_128"] = c.zero ? std::string() : HashToHex(c.hash);
    j["file"] = c.zero ? std::string() : DataFileName(c.file_index);
    j["file_offset"] = c.file_offset;
    chunks.push_back(std::move(j));
  }
  body["chunks"] = std::move(chunks);
  body["totals"] = {{"data_bytes", m.totals.data_bytes},
                    {"stored_bytes", m.totals.stored_bytes},
                    {"zero_bytes", m.totals.zero_bytes},
                    {"data_chunks", m.totals.data_chunks},
                    {"zero_chunks", m.totals.zero_chunks}};
  std::string text = std::string(kMagicWord) + " " + std::to_string(kFormatVersion) + "\n";
  try {
    text += body.dump(-1, ' ', false, Json::error_handler_t::strict);
  } catch (const Json::exception& e) {
    return Status::InvalidArgument(std::string("manifest cannot be encoded: ") + e.what());
  }
  text += "\n";
  text += std::string(kChecksumWord) + " " + Hex128(XXH3_128bits(text.data(), text.size())) + "\n";
  if (text.size() > kMaxManifestBytes)
    return Status::InvalidArgument("manifest would exceed 512 MiB");
  return text;
}

Result<Manifest> DecodeManifest(std::string_view bytes) {
  if (bytes.size() > kMaxManifestBytes)
    return Status::InvalidArgument("manifest larger than 512 MiB");
  // Line 1: the magic line.
  const size_t nl1 = bytes.find('\n');
  const std::string_view prefix = kMagicWord;
  if (bytes.substr(0, prefix.size() + 1) != std::string(prefix) + " ")
    return Status::InvalidArgument("not an export manifest (bad magic)");
  if (nl1 == std::string_view::npos)
    return Status::InvalidArgument("manifest is truncated (no end of the first line)");
  const std::string_view version_text = bytes.substr(prefix.size() + 1, nl1 - prefix.size() - 1);
  if (version_text.empty() || version_text.size() > 9)
    return Status::InvalidArgument("manifest version \"" + std::string(version_text) +
                                   "\" is not a number");
  uint32_t version = 0;
  for (char c : version_text) {
    if (c < '0' || c > '9')
      return Status::InvalidArgument("manifest version \"" + std::string(version_text) +
                                     "\" is not a number");
    version = version * 10 + static_cast<uint32_t>(c - '0');
  }
  // Line 2: the body, line 3: the checksum; the file ends after line 3.
  const size_t nl2 = bytes.find('\n', nl1 + 1);
  if (nl2 == std::string_view::npos || bytes.empty() || bytes.back() != '\n')
    return Status::InvalidArgument("manifest is truncated (no checksum line)");
  const std::string_view line3 = bytes.substr(nl2 + 1, bytes.size() - nl2 - 2);
  if (line3.find('\n') != std::string_view::npos || line3.size() < kChecksumWord.size() + 1 ||
      line3.substr(0, kChecksumWord.size() + 1) != std::string(kChecksumWord) + " ")
    return Status::InvalidArgument("manifest is truncated or malformed (no checksum line)");
  auto stored = HashFromHex(line3.substr(kChecksumWord.size() + 1));
  if (!stored.ok())
    return Status::InvalidArgument("manifest checksum line is malformed: " +
                                   stored.status().message());
  const XXH128_hash_t actual = XXH3_128bits(bytes.data(), nl2 + 1);
  if (actual.high64 != stored->high || actual.low64 != stored->low)
    return Status::InvalidArgument("manifest checksum does not match");
  if (version != kFormatVersion)
    return Status::InvalidArgument("unknown export format version " + std::to_string(version) +
                                   " (this reader knows version " + std::to_string(kFormatVersion) +
                                   ")");

  const std::string_view body_text = bytes.substr(nl1 + 1, nl2 - nl1 - 1);
  Json body = Json::parse(body_text.begin(), body_text.end(), nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) return Status::InvalidArgument("manifest body is not valid JSON");
  const std::string what = "manifest";
  VMR_RETURN_IF_ERROR(
      CheckKeys(body,
                {"format", "version", "vm_id", "vm_name", "definition", "generation_id",
                 "cut_time_unix_ms", "chunk_size", "disks", "files", "chunks", "totals"},
                what));
  VMR_ASSIGN_OR_RETURN(std::string format, GetString(body, "format", what));
  if (format != kFormatName)
    return Status::InvalidArgument("manifest format \"" + format + "\" is not " +
                                   std::string(kFormatName));
  VMR_ASSIGN_OR_RETURN(uint64_t body_version, GetUint(body, "version", what));
  if (body_version != version)
    return Status::InvalidArgument("manifest body version " + std::to_string(body_version) +
                                   " differs from its first line");
  Manifest m;
  VMR_ASSIGN_OR_RETURN(m.info.vm_id, GetString(body, "vm_id", what));
  VMR_ASSIGN_OR_RETURN(m.info.vm_name, GetString(body, "vm_name", what));
  VMR_ASSIGN_OR_RETURN(m.info.definition, GetString(body, "definition", what));
  VMR_ASSIGN_OR_RETURN(m.info.generation_id, GetString(body, "generation_id", what));
  VMR_ASSIGN_OR_RETURN(uint64_t cut, GetUint(body, "cut_time_unix_ms", what));
  m.info.cut_time_unix_ms = static_cast<int64_t>(cut);
  VMR_ASSIGN_OR_RETURN(uint64_t chunk_size, GetUint(body, "chunk_size", what, kMaxChunkSize));
  m.chunk_size = static_cast<uint32_t>(chunk_size);

  const Json& disks = body.at("disks");
  if (!disks.is_array() || disks.empty() || disks.size() > kMaxDisks)
    return Status::InvalidArgument("manifest: \"disks\" is not an array of 1..64 disks");
  for (size_t i = 0; i < disks.size(); ++i) {
    const std::string w = "disk " + std::to_string(i);
    VMR_RETURN_IF_ERROR(CheckKeys(disks[i], {"name", "size"}, w));
    ExportDisk d;
    VMR_ASSIGN_OR_RETURN(d.name, GetString(disks[i], "name", w));
    VMR_ASSIGN_OR_RETURN(d.size, GetUint(disks[i], "size", w));
    m.info.disks.push_back(std::move(d));
  }
  // Normalised values must be what is stored (lowercase id and generation).
  VMR_ASSIGN_OR_RETURN(ExportInfo normal, NormalizeInfo(m.info));
  if (normal.vm_id != m.info.vm_id || normal.generation_id != m.info.generation_id)
    return Status::InvalidArgument("manifest: vm_id / generation_id not in lowercase");

  const Json& files = body.at("files");
  if (!files.is_array() || files.size() > kMaxFiles)
    return Status::InvalidArgument("manifest: \"files\" is not an array of at most 100000 files");
  for (size_t f = 0; f < files.size(); ++f) {
    const std::string w = "data file entry " + std::to_string(f);
    VMR_RETURN_IF_ERROR(CheckKeys(files[f], {"name", "size"}, w));
    VMR_ASSIGN_OR_RETURN(std::string name, GetString(files[f], "name", w));
    if (name != DataFileName(static_cast<uint32_t>(f)))
      return Status::InvalidArgument(w + ": name \"" + name + "\" is not " +
                                     DataFileName(static_cast<uint32_t>(f)));
    VMR_ASSIGN_OR_RETURN(uint64_t size, GetUint(files[f], "size", w));
    m.file_sizes.push_back(size);
  }

  const Json& chunks = body.at("chunks");
  if (!chunks.is_array() || chunks.empty() || chunks.size() > kMaxChunks)
    return Status::InvalidArgument("manifest: \"chunks\" is not an array of 1..2^20 chunks");
  m.chunks.reserve(chunks.size());
  for (size_t i = 0; i < chunks.size(); ++i) {
    VMR_ASSIGN_OR_RETURN(ExportChunk c, DecodeChunk(chunks[i], i));
    m.chunks.push_back(c);
  }
  const Json& totals = body.at("totals");
  VMR_RETURN_IF_ERROR(
      CheckKeys(totals, {"data_bytes", "stored_bytes", "zero_bytes", "data_chunks", "zero_chunks"},
                "totals"));
  VMR_ASSIGN_OR_RETURN(m.totals.data_bytes, GetUint(totals, "data_bytes", "totals"));
  VMR_ASSIGN_OR_RETURN(m.totals.stored_bytes, GetUint(totals, "stored_bytes", "totals"));
  VMR_ASSIGN_OR_RETURN(m.totals.zero_bytes, GetUint(totals, "zero_bytes", "totals"));
  VMR_ASSIGN_OR_RETURN(m.totals.data_chunks, GetUint(totals, "data_chunks", "totals"));
  VMR_ASSIGN_OR_RETURN(m.totals.zero_chunks, GetUint(totals, "zero_chunks", "totals"));
  VMR_RETURN_IF_ERROR(ValidateManifest(m));
  return m;
}

}  // namespace vmreplica::exportimport
