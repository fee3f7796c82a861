#include "catalog/sqlite_util.h"

namespace vmreplica::catalog_internal {

Status SqliteError(sqlite3* db, int rc, std::string_view what) {
  std::string msg(what);
  msg += ": ";
  msg += (db != nullptr && sqlite3_extended_errcode(db) == rc) ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
  msg += " (";
  msg += sqlite3_errstr(rc);
  msg += ", code " + std::to_string(rc) + ")";
  switch (rc & 0xff) {
    case SQLITE_CONSTRAINT:
      if (rc == SQLITE_CONSTRAINT_UNIQUE || rc == SQLITE_CONSTRAINT_PRIMARYKEY) {
        return Status::AlreadyExists(std::move(msg));
      }
      if (rc == SQLITE_CONSTRAINT_FOREIGNKEY) return Status::NotFound(std::move(msg));
      return Status::InvalidArgument(std::move(msg));
    case SQLITE_BUSY:
    case SQLITE_LOCKED: return Status::Busy(std::move(msg));
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB: return Status::Corruption(std::move(msg));
    case SQLITE_IOERR:
    case SQLITE_FULL:
    case SQLITE_CANTOPEN:
    case SQLITE_READONLY:
    case SQLITE_PERM:
    case SQLITE_PROTOCOL: return Status::IOError(std::move(msg));
    default: return Status::Internal(std::move(msg));
  }
}

Stmt::Stmt(sqlite3* db, const char* sql) : db_(db), sql_(sql) {
  Check(sqlite3_prepare_v2(db_, sql, -1, &stmt_, nullptr), "prepare");
}

Stmt::~Stmt() { sqlite3_finalize(stmt_); }

void Stmt::Check(int rc, const char* what) {
  if (rc == SQLITE_OK || !status_.ok()) return;
  status_ = SqliteError(db_, rc, std::string(what) + " [" + sql_ + "]");
}

Stmt& Stmt::Bind(int i, int64_t v) {
  if (status_.ok()) Check(sqlite3_bind_int64(stmt_, i, v), "bind");
  return *this;
}

Stmt& Stmt::Bind(int i, std::string_view v) {
  if (status_.ok()) {
    Check(sqlite3_bind_text64(stmt_, i, v.data(), v.size(), SQLITE_TRANSIENT, SQLITE_UTF8), "bind");
  }
  return *this;
}

Result<bool> Stmt::Step() {
  if (!status_.ok()) return status_;
  int rc = sqlite3_step(stmt_);
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  Check(rc, "step");
  return status_;
}

Status Stmt::Run() {
  while (true) {
    Result<bool> r = Step();
    if (!r.ok()) return r.status();
    if (!*r) return Status::Ok();
  }
}

std::string Stmt::Text(int col) const {
  const unsigned char* p = sqlite3_column_text(stmt_, col);
  if (p == nullptr) return {};
  return std::string(reinterpret_cast<const char*>(p), static_cast<size_t>(sqlite3_column_bytes(stmt_, col)));
}

}  // namespace vmreplica::catalog_internal
