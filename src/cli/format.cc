#include "cli/format.h"

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <nlohmann/json.hpp>

namespace vmreplica::cli {

void Table::AddRow(std::vector<std::string> row) {
  row.resize(header_.size());
  rows_.push_back(std::move(row));
}

std::string Table::Render() const {
  std::vector<size_t> width(header_.size(), 0);
  auto measure = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], DisplayWidth(row[i]));
  };
  measure(header_);
  for (const auto& row : rows_) measure(row);

  std::string out;
  auto emit = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line.append(width[i] - DisplayWidth(row[i]) + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();  // empty last cells
    out += line;
    out += '\n';
  };
  emit(header_);
  for (const auto& row : rows_) emit(row);
  return out;
}

PropertyTable& PropertyTable::Add(std::string property, std::string value) {
  table_.AddRow({std::move(property), std::move(value)});
  return *this;
}

size_t DisplayWidth(std::string_view text) {
  // Counts every byte that does not continue a UTF-8 sequence (10xxxxxx).
  return static_cast<size_t>(
      std::count_if(text.begin(), text.end(), [](char c) { return (static_cast<unsigned char>(c) & 0xC0) != 0x80; }));
}

std::string_view BoolText(bool value) { return value ? "True" : "False"; }

std::string FormatUnixSeconds(int64_t unix_s) {
  if (unix_s == 0) return "-";
  std::time_t t = static_cast<std::time_t>(unix_s);
  std::tm tm{};
  if (gmtime_r(&t, &tm) == nullptr) return std::to_string(unix_s);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string FormatUnixMs(int64_t unix_ms) {
  if (unix_ms == 0) return "-";
  // Floor division, so that times before 1970 still round towards the past.
  int64_t s = unix_ms / 1000;
  if (unix_ms % 1000 < 0) --s;
  return FormatUnixSeconds(s);
}

std::string FormatHhMm(uint32_t minutes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%02u:%02u", minutes / 60, minutes % 60);
  return buf;
}

std::string FormatTimeSpan(int64_t seconds) {
  std::string sign;
  if (seconds < 0) {
    sign = "-";
    seconds = -seconds;
  }
  const int64_t days = seconds / 86400;
  char buf[80];
  std::snprintf(buf, sizeof buf, "%02lld:%02lld:%02lld", static_cast<long long>(seconds % 86400 / 3600),
                static_cast<long long>(seconds % 3600 / 60), static_cast<long long>(seconds % 60));
  return sign + (days > 0 ? std::to_string(days) + "." : std::string()) + buf;
}

std::string FormatElapsedMs(int64_t ms) {
  if (ms < 0) ms = 0;
  char buf[64];
  if (ms < 1000) {
    std::snprintf(buf, sizeof buf, "%lldms", static_cast<long long>(ms));
  } else if (ms < 60'000) {
    std::snprintf(buf, sizeof buf, "%.1fs", static_cast<double>(ms) / 1000.0);
  } else if (ms < 3'600'000) {
    std::snprintf(buf, sizeof buf, "%lldm%02llds", static_cast<long long>(ms / 60'000),
                  static_cast<long long>(ms / 1000 % 60));
  } else {
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", static_cast<long long>(ms / 3'600'000),
                  static_cast<long long>(ms / 60'000 % 60));
  }
  return buf;
}

std::string FormatBytes(uint64_t bytes) {
  if (bytes < 1024) return std::to_string(bytes) + " B";
  static constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(bytes) / 1024.0;
  size_t unit = 0;
  while (v >= 1024.0 && unit + 1 < std::size(kUnits)) {
    v /= 1024.0;
    ++unit;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", v, kUnits[unit]);
  return buf;
}

std::string ProgressBar(uint32_t percent, int width) {
  percent = std::min<uint32_t>(percent, 100);
  if (width < 1) width = 1;
  const int filled = static_cast<int>(percent) * width / 100;
  std::string bar = "[";
  bar.append(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(width - filled), '.');
  bar += "]";
  char pct[16];
  std::snprintf(pct, sizeof pct, "%u%%", percent);
  return bar + "  " + pct;
}

std::string Join(const std::vector<std::string>& values, std::string_view separator) {
  std::string out;
  for (size_t i = 0; i < values.size(); ++i) {
    if (i > 0) out += separator;
    out += values[i];
  }
  return out;
}

namespace {

using Json = nlohmann::ordered_json;

std::string ScalarText(const Json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_null()) return "";
  if (v.is_boolean()) return std::string(BoolText(v.get<bool>()));
  return v.dump();
}

void Flatten(const std::string& prefix, const Json& v, std::vector<std::pair<std::string, std::string>>* rows) {
  if (v.is_object()) {
    for (auto it = v.begin(); it != v.end(); ++it) {
      Flatten(prefix.empty() ? it.key() : prefix + "." + it.key(), it.value(), rows);
    }
    return;
  }
  if (v.is_array()) {
    const bool scalars = std::none_of(v.begin(), v.end(), [](const Json& e) { return e.is_structured(); });
    if (scalars) {
      std::vector<std::string> parts;
      for (const auto& e : v) parts.push_back(ScalarText(e));
      rows->emplace_back(prefix, Join(parts));
      return;
    }
    for (size_t i = 0; i < v.size(); ++i) Flatten(prefix + "[" + std::to_string(i) + "]", v[i], rows);
    return;
  }
  rows->emplace_back(prefix, ScalarText(v));
}

}  // namespace

std::vector<std::pair<std::string, std::string>> JsonObjectRows(const std::string& json_text) {
  std::vector<std::pair<std::string, std::string>> rows;
  Json doc = Json::parse(json_text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object()) {
    rows.emplace_back("Result", json_text);
    return rows;
  }
  Flatten("", doc, &rows);
  return rows;
}

}  // namespace vmreplica::cli
