// Thin helpers over the SQLite C API for the catalog: a prepared-statement
// holder and the mapping of SQLite result codes onto Status codes. Private
// to src/catalog.
#pragma once

#include <sqlite3.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "vmreplica/status.h"

namespace vmreplica::catalog_internal {

// Maps an SQLite (extended) result code onto a Status whose message is
// "<what>: <sqlite message> (<code name>)".
Status SqliteError(sqlite3* db, int rc, std::string_view what);

// One prepared statement. Bind parameters are 1-based, columns 0-based.
// Any error is kept and reported by Step()/Run()/status(), so binding can
// be written without checking each call.
class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql);
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;
  ~Stmt();

  Stmt& Bind(int i, int64_t v);
  Stmt& Bind(int i, std::string_view v);
  Stmt& BindU64(int i, uint64_t v) { return Bind(i, static_cast<int64_t>(v)); }
  Stmt& BindBool(int i, bool v) { return Bind(i, int64_t{v ? 1 : 0}); }

  // Advances: true with a row, false when done; errors in status().
  Result<bool> Step();
  // Steps to completion, for statements that return no rows.
  Status Run();

  int64_t Int(int col) const { return sqlite3_column_int64(stmt_, col); }
  uint64_t U64(int col) const { return static_cast<uint64_t>(Int(col)); }
  bool Bool(int col) const { return Int(col) != 0; }
  std::string Text(int col) const;

  const Status& status() const { return status_; }

 private:
  void Check(int rc, const char* what);

  sqlite3* const db_;
  const std::string sql_;
  sqlite3_stmt* stmt_ = nullptr;
  Status status_;
};

}  // namespace vmreplica::catalog_internal
