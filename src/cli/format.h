// Text output of the vmreplica command-line client: aligned tables, the
// "number (Name)" form of every WMI enumeration, times and durations.
// Pure functions, no I/O: the commands decide where the text goes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "vmreplica/model/enums.h"

namespace vmreplica::cli {

// A table with a header row and columns aligned on the widest cell
// (display width counts UTF-8 code points, not bytes). Columns are
// separated by two spaces; the last column is not padded, so no line has
// trailing blanks. A row shorter than the header is padded with empty
// cells; a longer one is an error of the caller (extra cells are dropped).
class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}

  void AddRow(std::vector<std::string> row);
  size_t rows() const { return rows_.size(); }

  // Every line ends with '\n'. A table without rows is its header only.
  std::string Render() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

// The two-column "Property  Value" table used for single objects.
class PropertyTable {
 public:
  PropertyTable() : table_({"Property", "Value"}) {}
  PropertyTable& Add(std::string property, std::string value);
  std::string Render() const { return table_.Render(); }

 private:
  Table table_;
};

// Display width of UTF-8 text: the number of code points.
size_t DisplayWidth(std::string_view text);

// "3 (Replicating)": the number, then the WMI name (or "Undefined").
template <typename E>
std::string NumberAndName(uint32_t number) {
  return std::to_string(number) + " (" + std::string(Name(static_cast<E>(number))) + ")";
}

// The WMI name alone ("Replicating"), or the number when it is not defined.
template <typename E>
std::string NameOrNumber(uint32_t number) {
  std::string_view name = Name(static_cast<E>(number));
  return name == "Undefined" ? std::to_string(number) : std::string(name);
}

// "True" / "False", as PowerShell prints booleans.
std::string_view BoolText(bool value);

// UTC ISO 8601 with seconds, "2025-01-02T03:04:05Z"; "-" for 0 (never).
std::string FormatUnixSeconds(int64_t unix_s);
std::string FormatUnixMs(int64_t unix_ms);

// Minutes after midnight as "HH:MM" (0 -> "00:00", 1110 -> "18:30").
std::string FormatHhMm(uint32_t minutes);

// Seconds as a .NET TimeSpan: "[d.]hh:mm:ss" ("12:00:00", "7.00:00:00").
std::string FormatTimeSpan(int64_t seconds);

// Milliseconds of elapsed time for humans: "850ms", "12.3s", "5m07s", "2h03m".
std::string FormatElapsedMs(int64_t ms);

// Bytes for humans: "512 B", "1.5 KiB", "20.0 MiB".
std::string FormatBytes(uint64_t bytes);

// "[#####.....]  50%" (`width` cells; percent clamped to 0..100).
std::string ProgressBar(uint32_t percent, int width = 10);

// Values joined with ", " ("" for none).
std::string Join(const std::vector<std::string>& values, std::string_view separator = ", ");

// The fields of a JSON object text as property rows, keys in document
// order; nested objects are flattened with dotted keys ("a.b"), arrays of
// scalars are joined with ", ", strings are unquoted, null is "". Text that
// is not a JSON object yields one row ("Result", text).
std::vector<std::pair<std::string, std::string>> JsonObjectRows(const std::string& json_text);

}  // namespace vmreplica::cli
