// The catalog's schema as an ordered, append-only list of migrations.
// Migration i (0-based) takes the database from user_version i to i + 1;
// Catalog::Open applies each pending one in its own transaction together
// with the new user_version. Never edit a released step: add a new one and
// bump kCatalogSchemaVersion (catalog.h).
#pragma once

#include <span>

namespace vmreplica::catalog_internal {

// SQL of each migration, in order; size() == kCatalogSchemaVersion.
std::span<const char* const> Migrations();

}  // namespace vmreplica::catalog_internal
