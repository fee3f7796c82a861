#include "vmreplica/catalog.h"

#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <thread>

#include "vmreplica/fileutil.h"

namespace vmreplica {
namespace {

class CatalogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmr-catalog-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    path_ = dir_ + "/catalog.db";
    Reopen();
  }
  void TearDown() override {
    catalog_.reset();
    std::filesystem::remove_all(dir_);
  }
  void Reopen() {
    catalog_.reset();
    auto c = Catalog::Open(path_);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    catalog_ = std::move(c).value();
  }
  // Runs one statement on the file with a separate raw connection.
  void RawExec(const std::string& sql) {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    char* err = nullptr;
    int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err);
    EXPECT_EQ(rc, SQLITE_OK) << (err ? err : "");
    sqlite3_free(err);
    sqlite3_close(db);
  }
  VmRecord MakeVm(const std::string& id, const std::string& name) {
    VmRecord vm{id, name, ReplicationMode::kPrimary, R"({"memory_mb":1024})", 1700000000123};
    EXPECT_TRUE(catalog_->PutVm(vm).ok());
    return vm;
  }
  RelationshipRecord MakeRelationship(const std::string& vm_id, int index) {
    RelationshipRecord r;
    r.vm_id = vm_id;
    r.index = index;
    EXPECT_TRUE(catalog_->PutRelationship(r).ok());
    return r;
  }

  std::string dir_;
  std::string path_;
  std::unique_ptr<Catalog> catalog_;
};

TEST_F(CatalogTest, NewCatalogHasCurrentSchemaAndWalMode) {
  EXPECT_EQ(*catalog_->SchemaVersion(), kCatalogSchemaVersion);
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  EXPECT_STREQ(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)), "wal");
  sqlite3_finalize(st);
  ASSERT_EQ(sqlite3_prepare_v2(db, "PRAGMA application_id", -1, &st, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(st, 0), kCatalogApplicationId);
  sqlite3_finalize(st);
  sqlite3_close(db);
}

TEST_F(CatalogTest, ServerSettingsDefaultUntilPutThenRoundTrip) {
  auto def = catalog_->GetServerSettings();
  ASSERT_TRUE(def.ok());
  EXPECT_FALSE(def->recovery_server_enabled);
  EXPECT_EQ(def->https_port, 443u);
  EXPECT_EQ(def->monitoring_interval_s, 12u * 3600);

  ServerSettings s;
  s.recovery_server_enabled = true;
  s.allowed_authentication_type = AllowedAuthenticationType::kKerberosAndCertificate;
  s.certificate_thumbprint = "0123456789abcdef0123456789abcdef01234567";
  s.http_port = 8080;
  s.https_port = 8443;
  s.monitoring_interval_s = 3600;
  s.monitoring_start_time_min = 1439;
  ASSERT_TRUE(catalog_->PutServerSettings(s).ok());
  s.https_port = 9443;  // a second Put replaces the row
  ASSERT_TRUE(catalog_->PutServerSettings(s).ok());
  Reopen();
  auto got = catalog_->GetServerSettings();
  ASSERT_TRUE(got.ok());
  EXPECT_TRUE(got->recovery_server_enabled);
  EXPECT_EQ(got->allowed_authentication_type, AllowedAuthenticationType::kKerberosAndCertificate);
  EXPECT_EQ(got->certificate_thumbprint, s.certificate_thumbprint);
  EXPECT_EQ(got->http_port, 8080u);
  EXPECT_EQ(got->https_port, 9443u);
  EXPECT_EQ(got->monitoring_interval_s, 3600u);
  EXPECT_EQ(got->monitoring_start_time_min, 1439u);
}

TEST_F(CatalogTest, AuthorizationEntriesAreKeyedCaseInsensitively) {
  AuthorizationEntry a{"Primary1.Example.com", "/srv/replicas/a", "tg1"};
  AuthorizationEntry b{"*", "/srv/replicas/any", ""};
  ASSERT_TRUE(catalog_->AddAuthorizationEntry(a).ok());
  ASSERT_TRUE(catalog_->AddAuthorizationEntry(b).ok());
  AuthorizationEntry dup{"primary1.example.COM", "/x", ""};
  EXPECT_EQ(catalog_->AddAuthorizationEntry(dup).code(), Code::kAlreadyExists);

  auto got = catalog_->GetAuthorizationEntry("PRIMARY1.example.com");
  ASSERT_TRUE(got.ok());
  ASSERT_TRUE(got->has_value());
  EXPECT_EQ((*got)->allowed_primary_host_system, "Primary1.Example.com");
  EXPECT_EQ((*got)->replica_storage_location, "/srv/replicas/a");
  EXPECT_EQ((*got)->trust_group, "tg1");
  EXPECT_FALSE(catalog_->GetAuthorizationEntry("other.example.com")->has_value());

  AuthorizationEntry mod{"primary1.example.com", "/srv/replicas/b", "tg2"};
  ASSERT_TRUE(catalog_->ModifyAuthorizationEntry(mod).ok());
  got = catalog_->GetAuthorizationEntry("primary1.example.com");
  EXPECT_EQ((*got)->allowed_primary_host_system, "primary1.example.com");
  EXPECT_EQ((*got)->replica_storage_location, "/srv/replicas/b");
  EXPECT_EQ((*got)->trust_group, "tg2");
  EXPECT_EQ(catalog_->ModifyAuthorizationEntry({"nope.example.com", "/x", ""}).code(), Code::kNotFound);

  auto list = catalog_->ListAuthorizationEntries();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].allowed_primary_host_system, "*");

  EXPECT_TRUE(catalog_->RemoveAuthorizationEntry("PRIMARY1.EXAMPLE.COM").ok());
  EXPECT_EQ(catalog_->RemoveAuthorizationEntry("primary1.example.com").code(), Code::kNotFound);
  EXPECT_EQ(catalog_->ListAuthorizationEntries()->size(), 1u);
}

TEST_F(CatalogTest, VmsRoundTripAndNamesMayRepeat) {
  VmRecord vm = MakeVm("11111111-1111-4111-8111-111111111111", "web");
  auto got = catalog_->GetVm(vm.id);
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ((*got)->name, "web");
  EXPECT_EQ((*got)->mode, ReplicationMode::kPrimary);
  EXPECT_EQ((*got)->definition_json, vm.definition_json);
  EXPECT_EQ((*got)->created_ms, vm.created_ms);

  vm.mode = ReplicationMode::kExtendedReplica;
  vm.name = "web2";
  ASSERT_TRUE(catalog_->PutVm(vm).ok());
  EXPECT_EQ((*catalog_->GetVm(vm.id))->mode, ReplicationMode::kExtendedReplica);
  EXPECT_EQ((*catalog_->FindVmByName("web2"))->id, vm.id);
  EXPECT_FALSE(catalog_->FindVmByName("web")->has_value());
  EXPECT_FALSE(catalog_->GetVm("missing")->has_value());

  MakeVm("22222222-2222-4222-8222-222222222222", "web2");
  auto ambiguous = catalog_->FindVmByName("web2");
  EXPECT_EQ(ambiguous.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(ambiguous.status().message().find("ambiguous"), std::string::npos);
  EXPECT_EQ(catalog_->ListVms()->size(), 2u);

  EXPECT_TRUE(catalog_->DeleteVm(vm.id).ok());
  EXPECT_EQ(catalog_->DeleteVm(vm.id).code(), Code::kNotFound);
  EXPECT_EQ(catalog_->ListVms()->size(), 1u);
}

TEST_F(CatalogTest, DisksRoundTripInOrderAndLargeSizes) {
  VmRecord vm = MakeVm("vm-1", "db");
  std::vector<DiskRecord> disks = {
      {"vm-1", "vdb", 0xFFFFFFFFFFFFFFFFull, "/var/lib/vm/b.qcow2", "drive-b", 4096, false},
      {"vm-1", "vda", 10ull << 30, "/var/lib/vm/a.raw", "drive-a", 65536, true},
  };
  ASSERT_TRUE(catalog_->PutDisks(vm.id, disks).ok());
  auto got = catalog_->ListDisks(vm.id);
  ASSERT_TRUE(got.ok());
  ASSERT_EQ(got->size(), 2u);
  for (size_t i = 0; i < disks.size(); ++i) {
    EXPECT_EQ((*got)[i].vm_id, vm.id);
    EXPECT_EQ((*got)[i].name, disks[i].name);
    EXPECT_EQ((*got)[i].size_bytes, disks[i].size_bytes);
    EXPECT_EQ((*got)[i].path, disks[i].path);
    EXPECT_EQ((*got)[i].node_name, disks[i].node_name);
    EXPECT_EQ((*got)[i].granularity, disks[i].granularity);
    EXPECT_EQ((*got)[i].included, disks[i].included);
  }
  // A new set replaces the old one.
  ASSERT_TRUE(catalog_->PutDisks(vm.id, {disks[1]}).ok());
  EXPECT_EQ(catalog_->ListDisks(vm.id)->size(), 1u);
  EXPECT_EQ(catalog_->PutDisks("nope", disks).code(), Code::kNotFound);
}

TEST_F(CatalogTest, PutDisksFailingHalfWayLeavesOldDisksIntact) {
  VmRecord vm = MakeVm("vm-1", "db");
  std::vector<DiskRecord> old = {{vm.id, "vda", 1 << 20, "/a", "a", 4096, true},
                                 {vm.id, "vdb", 2 << 20, "/b", "b", 4096, true}};
  ASSERT_TRUE(catalog_->PutDisks(vm.id, old).ok());
  std::vector<DiskRecord> bad = {{vm.id, "vdc", 3 << 20, "/c", "c", 4096, true},
                                 {vm.id, "vdd", 4 << 20, "/d", "d", 4096, true},
                                 {vm.id, "vdc", 5 << 20, "/c2", "c2", 4096, true}};
  Status s = catalog_->PutDisks(vm.id, bad);
  EXPECT_EQ(s.code(), Code::kAlreadyExists);
  EXPECT_NE(s.message().find("vdc"), std::string::npos) << s.message();
  auto got = catalog_->ListDisks(vm.id);
  ASSERT_TRUE(got.ok());
  ASSERT_EQ(got->size(), 2u);
  EXPECT_EQ((*got)[0].name, "vda");
  EXPECT_EQ((*got)[1].name, "vdb");
  // The connection is usable afterwards (no transaction left open).
  EXPECT_TRUE(catalog_->PutDisks(vm.id, {old[0]}).ok());
  Reopen();
  EXPECT_EQ(catalog_->ListDisks(vm.id)->size(), 1u);
}

TEST_F(CatalogTest, RelationshipRoundTripsEveryField) {
  MakeVm("vm-1", "db");
  RelationshipRecord r;
  r.vm_id = "vm-1";
  r.index = 1;
  r.local_mode = ReplicationMode::kReplica;
  r.state = ReplicationState::kFiredrillInProgress;
  r.health = ReplicationHealth::kWarning;
  RelationshipSettings& s = r.settings;
  s.recovery_connection_point = "replica.example.com";
  s.recovery_server_port = 8443;
  s.authentication_type = AuthenticationType::kKerberos;
  s.certificate_thumbprint = "abcdef";
  s.compression_enabled = false;
  s.replication_interval_s = 900;
  s.recovery_history = 24;
  s.application_consistent_snapshot_interval_h = 12;
  s.included_disks = {"vda", "vdb \"quoted\""};
  s.auto_resynchronize_enabled = true;
  s.auto_resynchronize_interval_start_min = 1;
  s.auto_resynchronize_interval_end_min = 2;
  s.enable_write_order_preservation_across_disks = false;
  s.bypass_proxy_server = true;
  s.replicate_host_kvp_items = false;
  s.recovery_host_system = "rhs";
  s.primary_connection_point = "pcp";
  s.primary_host_system = "phs";
  r.last_replication_ms = 1;
  r.last_apply_ms = 2;
  r.last_app_consistent_ms = 3;
  r.last_replication_type = ReplicationType::kApplicationConsistent;
  r.failed_over_replication_type = ReplicationType::kPlanned;
  r.generation_id = "gen-42";
  r.sequence = 0x8000000000000001ull;
  r.initial_replication_type = InitialReplicationType::kExport;
  ASSERT_TRUE(catalog_->PutRelationship(r).ok());
  Reopen();

  auto got_or = catalog_->GetRelationship("vm-1", 1);
  ASSERT_TRUE(got_or.ok() && got_or->has_value()) << got_or.status().ToString();
  const RelationshipRecord& g = **got_or;
  EXPECT_EQ(g.vm_id, r.vm_id);
  EXPECT_EQ(g.index, 1);
  EXPECT_EQ(g.local_mode, r.local_mode);
  EXPECT_EQ(g.state, r.state);
  EXPECT_EQ(g.health, r.health);
  EXPECT_EQ(g.settings.recovery_connection_point, s.recovery_connection_point);
  EXPECT_EQ(g.settings.recovery_server_port, s.recovery_server_port);
  EXPECT_EQ(g.settings.authentication_type, s.authentication_type);
  EXPECT_EQ(g.settings.certificate_thumbprint, s.certificate_thumbprint);
  EXPECT_EQ(g.settings.compression_enabled, s.compression_enabled);
  EXPECT_EQ(g.settings.replication_interval_s, s.replication_interval_s);
  EXPECT_EQ(g.settings.recovery_history, s.recovery_history);
  EXPECT_EQ(g.settings.application_consistent_snapshot_interval_h, s.application_consistent_snapshot_interval_h);
  EXPECT_EQ(g.settings.included_disks, s.included_disks);
  EXPECT_EQ(g.settings.auto_resynchronize_enabled, s.auto_resynchronize_enabled);
  EXPECT_EQ(g.settings.auto_resynchronize_interval_start_min, s.auto_resynchronize_interval_start_min);
  EXPECT_EQ(g.settings.auto_resynchronize_interval_end_min, s.auto_resynchronize_interval_end_min);
  EXPECT_EQ(g.settings.enable_write_order_preservation_across_disks,
            s.enable_write_order_preservation_across_disks);
  EXPECT_EQ(g.settings.bypass_proxy_server, s.bypass_proxy_server);
  EXPECT_EQ(g.settings.replicate_host_kvp_items, s.replicate_host_kvp_items);
  EXPECT_EQ(g.settings.recovery_host_system, s.recovery_host_system);
  EXPECT_EQ(g.settings.primary_connection_point, s.primary_connection_point);
  EXPECT_EQ(g.settings.primary_host_system, s.primary_host_system);
  EXPECT_EQ(g.initial_replication_type, InitialReplicationType::kExport);
  EXPECT_EQ(g.last_replication_ms, 1);
  EXPECT_EQ(g.last_apply_ms, 2);
  EXPECT_EQ(g.last_app_consistent_ms, 3);
  EXPECT_EQ(g.last_replication_type, r.last_replication_type);
  EXPECT_EQ(g.failed_over_replication_type, r.failed_over_replication_type);
  EXPECT_EQ(g.generation_id, r.generation_id);
  EXPECT_EQ(g.sequence, r.sequence);

  // Upsert, list, delete.
  r.state = ReplicationState::kReplicating;
  ASSERT_TRUE(catalog_->PutRelationship(r).ok());
  MakeRelationship("vm-1", 0);
  auto list = catalog_->ListRelationships();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].index, 0);
  EXPECT_EQ((*list)[1].state, ReplicationState::kReplicating);
  EXPECT_TRUE(catalog_->DeleteRelationship("vm-1", 1).ok());
  EXPECT_EQ(catalog_->DeleteRelationship("vm-1", 1).code(), Code::kNotFound);
  EXPECT_FALSE(catalog_->GetRelationship("vm-1", 1)->has_value());
}

TEST_F(CatalogTest, RelationshipNeedsItsVmAndAValidIndex) {
  RelationshipRecord r;
  r.vm_id = "ghost";
  EXPECT_EQ(catalog_->PutRelationship(r).code(), Code::kNotFound);
  MakeVm("vm-1", "db");
  r.vm_id = "vm-1";
  r.index = 2;
  EXPECT_EQ(catalog_->PutRelationship(r).code(), Code::kInvalidArgument);
}

TEST_F(CatalogTest, SettingsMissingFromAnOldRowTakeDefaultsAndBadTypesAreCorruption) {
  MakeVm("vm-1", "db");
  MakeRelationship("vm-1", 0);
  catalog_.reset();
  RawExec(R"(UPDATE relationships SET settings_json = '{"recovery_server_port": 443}')");
  Reopen();
  auto got = catalog_->GetRelationship("vm-1", 0);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_EQ((*got)->settings.recovery_server_port, 443u);
  EXPECT_EQ((*got)->settings.replication_interval_s, 300u);
  EXPECT_TRUE((*got)->settings.compression_enabled);

  catalog_.reset();
  RawExec(R"(UPDATE relationships SET settings_json = '{"recovery_server_port": -1}')");
  Reopen();
  EXPECT_EQ(catalog_->GetRelationship("vm-1", 0).status().code(), Code::kCorruption);
  catalog_.reset();
  RawExec("UPDATE relationships SET settings_json = '{}', state = 99");
  Reopen();
  auto bad_state = catalog_->ListRelationships();
  EXPECT_EQ(bad_state.status().code(), Code::kCorruption);
  EXPECT_NE(bad_state.status().message().find("state"), std::string::npos);
}

TEST_F(CatalogTest, DeletingAVmCascadesToEverythingItOwns) {
  MakeVm("vm-1", "db");
  MakeVm("vm-2", "other");
  ASSERT_TRUE(catalog_->PutDisks("vm-1", {{"vm-1", "vda", 1, "/a", "a", 4096, true}}).ok());
  MakeRelationship("vm-1", 0);
  ASSERT_TRUE(catalog_->ResetStatistics("vm-1", 0, 5).ok());
  ASSERT_TRUE(catalog_->AddRecoveryPoint({"p1", "vm-1", 10, 1, 1, "g"}).ok());
  ASSERT_TRUE(catalog_->AddRecoveryPoint({"p2", "vm-2", 10, 1, 1, "g"}).ok());

  ASSERT_TRUE(catalog_->DeleteVm("vm-1").ok());
  EXPECT_TRUE(catalog_->ListDisks("vm-1")->empty());
  EXPECT_TRUE(catalog_->ListRelationships()->empty());
  EXPECT_FALSE(catalog_->GetStatistics("vm-1", 0)->has_value());
  EXPECT_TRUE(catalog_->ListRecoveryPoints("vm-1")->empty());
  EXPECT_EQ(catalog_->ListRecoveryPoints("vm-2")->size(), 1u);
}

TEST_F(CatalogTest, RecoveryPointsRoundTripInTimeOrder) {
  MakeVm("vm-1", "db");
  RecoveryPointRecord late{"p-late", "vm-1", 2000, 2, 0xFFFFFFFFFFFFFFF0ull, "gen-b"};
  RecoveryPointRecord early{"p-early", "vm-1", 1000, 3, 7, "gen-a"};
  ASSERT_TRUE(catalog_->AddRecoveryPoint(late).ok());
  ASSERT_TRUE(catalog_->AddRecoveryPoint(early).ok());
  EXPECT_EQ(catalog_->AddRecoveryPoint(early).code(), Code::kAlreadyExists);
  EXPECT_EQ(catalog_->AddRecoveryPoint({"p-x", "ghost", 1, 1, 1, ""}).code(), Code::kNotFound);

  auto list = catalog_->ListRecoveryPoints("vm-1");
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 2u);
  const RecoveryPointRecord& a = (*list)[0];
  const RecoveryPointRecord& b = (*list)[1];
  EXPECT_EQ(a.id, "p-early");
  EXPECT_EQ(a.vm_id, "vm-1");
  EXPECT_EQ(a.time_ms, 1000);
  EXPECT_EQ(a.kind, 3);
  EXPECT_EQ(a.sequence, 7u);
  EXPECT_EQ(a.generation_id, "gen-a");
  EXPECT_EQ(b.id, "p-late");
  EXPECT_EQ(b.kind, 2);
  EXPECT_EQ(b.sequence, late.sequence);

  EXPECT_TRUE(catalog_->DeleteRecoveryPoint("p-early").ok());
  EXPECT_EQ(catalog_->DeleteRecoveryPoint("p-early").code(), Code::kNotFound);
  // All or nothing.
  EXPECT_EQ(catalog_->DeleteRecoveryPoints({"p-late", "p-missing"}).code(), Code::kNotFound);
  EXPECT_EQ(catalog_->ListRecoveryPoints("vm-1")->size(), 1u);
  EXPECT_TRUE(catalog_->DeleteRecoveryPoints({"p-late"}).ok());
  EXPECT_TRUE(catalog_->ListRecoveryPoints("vm-1")->empty());
}

TEST_F(CatalogTest, StagedLogsRoundTripUpsertAndDeleteByState) {
  MakeVm("vm-1", "db");
  StagedLogRecord staged{"vm-1", 0xFFFFFFFFFFFFFFF0ull, StagedLogState::kStaged, "x.vrl", 1ull << 40, 1700000000001};
  StagedLogRecord early{"vm-1", 7, StagedLogState::kStaged, "00000000000000000007.vrl", 4096, 5};
  StagedLogRecord rejected{"vm-1", 7, StagedLogState::kRejected, "rejected/00000000000000000007.vrl", 100, 6};
  ASSERT_TRUE(catalog_->PutStagedLog(staged).ok());
  ASSERT_TRUE(catalog_->PutStagedLog(rejected).ok());
  ASSERT_TRUE(catalog_->PutStagedLog(early).ok());
  EXPECT_EQ(catalog_->PutStagedLog({"ghost", 1, StagedLogState::kStaged, "a", 1, 1}).code(), Code::kNotFound);
  EXPECT_EQ(catalog_->PutStagedLog({"vm-1", 1, static_cast<StagedLogState>(9), "a", 1, 1}).code(),
            Code::kInvalidArgument);

  auto list = catalog_->ListStagedLogs("vm-1");
  ASSERT_TRUE(list.ok()) << list.status().ToString();
  ASSERT_EQ(list->size(), 3u);
  EXPECT_EQ((*list)[0].sequence, 7u);
  EXPECT_EQ((*list)[0].state, StagedLogState::kStaged);
  EXPECT_EQ((*list)[0].file_name, "00000000000000000007.vrl");
  EXPECT_EQ((*list)[0].size_bytes, 4096u);
  EXPECT_EQ((*list)[0].received_ms, 5);
  EXPECT_EQ((*list)[1].state, StagedLogState::kRejected);
  EXPECT_EQ((*list)[1].file_name, "rejected/00000000000000000007.vrl");
  EXPECT_EQ((*list)[2].sequence, staged.sequence);
  EXPECT_EQ((*list)[2].size_bytes, 1ull << 40);
  EXPECT_EQ((*list)[2].received_ms, 1700000000001);

  // Upsert: the same key replaces the row.
  rejected.size_bytes = 200;
  ASSERT_TRUE(catalog_->PutStagedLog(rejected).ok());
  auto got = catalog_->GetStagedLog("vm-1", 7, StagedLogState::kRejected);
  ASSERT_TRUE(got.ok() && got->has_value());
  EXPECT_EQ((*got)->size_bytes, 200u);
  EXPECT_FALSE(catalog_->GetStagedLog("vm-1", 8, StagedLogState::kStaged)->has_value());

  EXPECT_TRUE(catalog_->DeleteStagedLog("vm-1", 7, StagedLogState::kStaged).ok());
  EXPECT_EQ(catalog_->DeleteStagedLog("vm-1", 7, StagedLogState::kStaged).code(), Code::kNotFound);
  EXPECT_TRUE(catalog_->GetStagedLog("vm-1", 7, StagedLogState::kRejected)->has_value());
  Reopen();
  EXPECT_EQ(catalog_->ListStagedLogs("vm-1")->size(), 2u);
  ASSERT_TRUE(catalog_->DeleteVm("vm-1").ok());
  EXPECT_TRUE(catalog_->ListStagedLogs("vm-1")->empty());
}

TEST_F(CatalogTest, StagedLogWithAnUnknownStateNumberIsCorruption) {
  MakeVm("vm-1", "db");
  ASSERT_TRUE(catalog_->PutStagedLog({"vm-1", 3, StagedLogState::kStaged, "a.vrl", 1, 1}).ok());
  RawExec("UPDATE staged_logs SET state = 3");
  EXPECT_EQ(catalog_->ListStagedLogs("vm-1").status().code(), Code::kCorruption);
}

TEST_F(CatalogTest, VersionOneCatalogIsMigratedAndKeepsItsRows) {
  MakeVm("vm-1", "db");
  catalog_.reset();
  // Turn the file back into a version-1 catalog: no staged_logs table.
  RawExec("DROP TABLE staged_logs; DROP TABLE failover_network_settings; "
          "ALTER TABLE relationships DROP COLUMN initial_type; PRAGMA user_version = 1");
  Reopen();
  EXPECT_EQ(*catalog_->SchemaVersion(), kCatalogSchemaVersion);
  EXPECT_TRUE(catalog_->GetVm("vm-1")->has_value());
  EXPECT_TRUE(catalog_->PutStagedLog({"vm-1", 1, StagedLogState::kStaged, "a.vrl", 1, 1}).ok());
}

TEST_F(CatalogTest, VersionTwoCatalogIsMigratedToTheLatestAndKeepsItsRows) {
  MakeVm("vm-1", "db");
  ASSERT_TRUE(catalog_->PutStagedLog({"vm-1", 4, StagedLogState::kStaged, "a.vrl", 1, 1}).ok());
  catalog_.reset();
  // Turn the file back into a version-2 catalog: no failover_network_settings
  // table (v3), no relationships.initial_type column (v4).
  RawExec("DROP TABLE failover_network_settings; ALTER TABLE relationships DROP COLUMN initial_type; "
          "PRAGMA user_version = 2");
  Reopen();
  EXPECT_EQ(*catalog_->SchemaVersion(), kCatalogSchemaVersion);
  EXPECT_TRUE(catalog_->GetVm("vm-1")->has_value());
  EXPECT_EQ(catalog_->ListStagedLogs("vm-1")->size(), 1u);
  FailoverNetworkRecord a;
  a.adapter = "52:54:00:00:00:01";
  a.dhcp_enabled = true;
  ASSERT_TRUE(catalog_->PutFailoverNetworkSettings("vm-1", {a}).ok());
  EXPECT_EQ(catalog_->GetFailoverNetworkSettings("vm-1")->size(), 1u);
}

// Version 3 -> 4: a relationship row gets initial_type 1 (network).
TEST_F(CatalogTest, VersionThreeRelationshipsGetTheNetworkInitialTypeAtMigration) {
  MakeVm("vm-1", "db");
  RelationshipRecord r;
  r.vm_id = "vm-1";
  r.state = ReplicationState::kReplicating;
  r.settings.recovery_connection_point = "replica.example.com";
  r.settings.recovery_server_port = 8443;
  r.generation_id = "g";
  r.sequence = 7;
  r.initial_replication_type = InitialReplicationType::kSeededNetwork;
  ASSERT_TRUE(catalog_->PutRelationship(r).ok());
  catalog_.reset();
  RawExec("ALTER TABLE relationships DROP COLUMN initial_type; PRAGMA user_version = 3");
  Reopen();
  EXPECT_EQ(*catalog_->SchemaVersion(), kCatalogSchemaVersion);
  auto got = catalog_->GetRelationship("vm-1", 0);
  ASSERT_TRUE(got.ok() && got->has_value()) << got.status().ToString();
  EXPECT_EQ((*got)->initial_replication_type, InitialReplicationType::kNetwork);
  EXPECT_EQ((*got)->sequence, 7u);
  EXPECT_EQ((*got)->state, ReplicationState::kReplicating);
}

FailoverNetworkRecord StaticAdapter(const std::string& adapter, const std::string& ip) {
  FailoverNetworkRecord a;
  a.adapter = adapter;
  a.ip_addresses = {ip, "fd00::5"};
  a.subnets = {"255.255.255.0", "64"};
  a.default_gateways = {"10.0.0.1", "10.0.0.2"};
  a.dns_servers = {"10.0.0.53"};
  return a;
}

bool SameSettings(const FailoverNetworkRecord& a, const FailoverNetworkRecord& b) {
  return a.adapter == b.adapter && a.ip_addresses == b.ip_addresses && a.subnets == b.subnets &&
         a.default_gateways == b.default_gateways && a.dns_servers == b.dns_servers && a.dhcp_enabled == b.dhcp_enabled;
}

TEST_F(CatalogTest, FailoverNetworkSettingsRoundTripInOrderAndSurviveReopen) {
  MakeVm("vm-1", "db");
  FailoverNetworkRecord dhcp;
  dhcp.adapter = "52:54:00:00:00:02";
  dhcp.dhcp_enabled = true;
  dhcp.dns_servers = {"1.1.1.1"};
  // Given in non-sorted order: read back in the same order.
  std::vector<FailoverNetworkRecord> set = {StaticAdapter("52:54:00:00:00:09", "10.0.0.5"), dhcp};
  ASSERT_TRUE(catalog_->PutFailoverNetworkSettings("vm-1", set).ok());
  Reopen();
  auto got = catalog_->GetFailoverNetworkSettings("vm-1");
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  ASSERT_EQ(got->size(), 2u);
  for (size_t i = 0; i < set.size(); ++i) {
    EXPECT_TRUE(SameSettings((*got)[i], set[i])) << i;
    EXPECT_EQ((*got)[i].vm_id, "vm-1");
  }
  EXPECT_TRUE(catalog_->GetFailoverNetworkSettings("vm-2")->empty());
}

TEST_F(CatalogTest, FailoverNetworkPutReplacesTheWholeSet) {
  MakeVm("vm-1", "db");
  ASSERT_TRUE(catalog_->PutFailoverNetworkSettings("vm-1", {StaticAdapter("a", "10.0.0.5"),
                                                           StaticAdapter("b", "10.0.0.6")})
                  .ok());
  ASSERT_TRUE(catalog_->PutFailoverNetworkSettings("vm-1", {StaticAdapter("b", "10.0.0.7")}).ok());
  auto got = catalog_->GetFailoverNetworkSettings("vm-1");
  ASSERT_EQ(got->size(), 1u);
  EXPECT_EQ((*got)[0].adapter, "b");
  EXPECT_EQ((*got)[0].ip_addresses[0], "10.0.0.7");
  ASSERT_TRUE(catalog_->PutFailoverNetworkSettings("vm-1", {}).ok());
  EXPECT_TRUE(catalog_->GetFailoverNetworkSettings("vm-1")->empty());
}

TEST_F(CatalogTest, FailoverNetworkRefusalsChangeNothing) {
  MakeVm("vm-1", "db");
  ASSERT_TRUE(catalog_->PutFailoverNetworkSettings("vm-1", {StaticAdapter("a", "10.0.0.5")}).ok());
  EXPECT_EQ(catalog_->PutFailoverNetworkSettings("vm-9", {StaticAdapter("a", "10.0.0.5")}).code(), Code::kNotFound);
  EXPECT_EQ(catalog_->PutFailoverNetworkSettings("vm-1", {StaticAdapter("b", "10.0.0.6"),
                                                          StaticAdapter("b", "10.0.0.7")})
                .code(),
            Code::kAlreadyExists);
  EXPECT_EQ(catalog_->PutFailoverNetworkSettings("vm-1", {StaticAdapter("", "10.0.0.6")}).code(),
            Code::kInvalidArgument);
  EXPECT_EQ(catalog_->PutFailoverNetworkSettings("vm-1", {StaticAdapter("c", "10.0.0.\xff")}).code(),
            Code::kInvalidArgument);
  auto got = catalog_->GetFailoverNetworkSettings("vm-1");
  ASSERT_EQ(got->size(), 1u);
  EXPECT_TRUE(SameSettings((*got)[0], StaticAdapter("a", "10.0.0.5")));
}

TEST_F(CatalogTest, FailoverNetworkDeleteOneAdapterAndDeletedWithTheVm) {
  MakeVm("vm-1", "db");
  ASSERT_TRUE(catalog_->PutFailoverNetworkSettings("vm-1", {StaticAdapter("a", "10.0.0.5"),
                                                           StaticAdapter("b", "10.0.0.6")})
                  .ok());
  ASSERT_TRUE(catalog_->DeleteFailoverNetworkSettings("vm-1", "a").ok());
  EXPECT_EQ(catalog_->DeleteFailoverNetworkSettings("vm-1", "a").code(), Code::kNotFound);
  ASSERT_EQ(catalog_->GetFailoverNetworkSettings("vm-1")->size(), 1u);
  ASSERT_TRUE(catalog_->DeleteVm("vm-1").ok());
  MakeVm("vm-1", "db");  // same id again: nothing left over from the deleted VM
  EXPECT_TRUE(catalog_->GetFailoverNetworkSettings("vm-1")->empty());
}

TEST_F(CatalogTest, FailoverNetworkRowThatDoesNotDecodeIsCorruption) {
  MakeVm("vm-1", "db");
  ASSERT_TRUE(catalog_->PutFailoverNetworkSettings("vm-1", {StaticAdapter("a", "10.0.0.5")}).ok());
  RawExec("UPDATE failover_network_settings SET subnets_json = '[1]'");
  EXPECT_EQ(catalog_->GetFailoverNetworkSettings("vm-1").status().code(), Code::kCorruption);
  RawExec("UPDATE failover_network_settings SET subnets_json = '[]', dhcp_enabled = 7");
  EXPECT_EQ(catalog_->GetFailoverNetworkSettings("vm-1").status().code(), Code::kCorruption);
  RawExec("UPDATE failover_network_settings SET dhcp_enabled = 0, dns_servers_json = 'not json'");
  EXPECT_EQ(catalog_->GetFailoverNetworkSettings("vm-1").status().code(), Code::kCorruption);
}

TEST_F(CatalogTest, StatisticsRoundTripAndResetStartsANewWindow) {
  MakeVm("vm-1", "db");
  StatisticsRecord orphan;
  orphan.vm_id = "vm-1";
  EXPECT_EQ(catalog_->PutStatistics(orphan).code(), Code::kNotFound);
  MakeRelationship("vm-1", 0);
  EXPECT_FALSE(catalog_->GetStatistics("vm-1", 0)->has_value());

  StatisticsRecord s;
  s.vm_id = "vm-1";
  s.index = 0;
  s.start_ms = 100;
  s.end_ms = 200;
  s.replication_success_count = 3;
  s.replication_size_bytes = 4;
  s.max_replication_size_bytes = 5;
  s.replication_latency_ms = 6;
  s.max_replication_latency_ms = 7;
  s.replication_miss_count = 8;
  s.network_failure_count = 9;
  s.replication_failure_count = 10;
  s.pending_replication_size_bytes = 11;
  s.application_consistent_snapshot_failure_count = 12;
  s.replication_health = ReplicationHealth::kCritical;
  s.last_test_failover_ms = 13;
  s.initial_replication_size_bytes = 0xFFFFFFFFFFFFFFFFull;
  s.health_issues = {"replica unreachable", "missed 3 cycles"};
  ASSERT_TRUE(catalog_->PutStatistics(s).ok());
  Reopen();
  auto got_or = catalog_->GetStatistics("vm-1", 0);
  ASSERT_TRUE(got_or.ok() && got_or->has_value()) << got_or.status().ToString();
  const StatisticsRecord& g = **got_or;
  EXPECT_EQ(g.vm_id, "vm-1");
  EXPECT_EQ(g.index, 0);
  EXPECT_EQ(g.start_ms, 100);
  EXPECT_EQ(g.end_ms, 200);
  EXPECT_EQ(g.replication_success_count, 3u);
  EXPECT_EQ(g.replication_size_bytes, 4u);
  EXPECT_EQ(g.max_replication_size_bytes, 5u);
  EXPECT_EQ(g.replication_latency_ms, 6u);
  EXPECT_EQ(g.max_replication_latency_ms, 7u);
  EXPECT_EQ(g.replication_miss_count, 8u);
  EXPECT_EQ(g.network_failure_count, 9u);
  EXPECT_EQ(g.replication_failure_count, 10u);
  EXPECT_EQ(g.pending_replication_size_bytes, 11u);
  EXPECT_EQ(g.application_consistent_snapshot_failure_count, 12u);
  EXPECT_EQ(g.replication_health, ReplicationHealth::kCritical);
  EXPECT_EQ(g.last_test_failover_ms, 13);
  EXPECT_EQ(g.initial_replication_size_bytes, s.initial_replication_size_bytes);
  EXPECT_EQ(g.health_issues, s.health_issues);

  ASSERT_TRUE(catalog_->ResetStatistics("vm-1", 0, 5000).ok());
  const StatisticsRecord r = **catalog_->GetStatistics("vm-1", 0);
  EXPECT_EQ(r.start_ms, 5000);
  EXPECT_EQ(r.end_ms, 0);
  EXPECT_EQ(r.replication_success_count, 0u);
  EXPECT_EQ(r.replication_size_bytes, 0u);
  EXPECT_EQ(r.max_replication_latency_ms, 0u);
  EXPECT_EQ(r.network_failure_count, 0u);
  EXPECT_EQ(r.initial_replication_size_bytes, 0u);
  EXPECT_EQ(r.replication_health, ReplicationHealth::kCritical);
  EXPECT_EQ(r.last_test_failover_ms, 13);
  EXPECT_EQ(r.health_issues, s.health_issues);
  EXPECT_EQ(catalog_->ResetStatistics("vm-1", 1, 0).code(), Code::kNotFound);

  // Deleting the relationship deletes its statistics.
  ASSERT_TRUE(catalog_->DeleteRelationship("vm-1", 0).ok());
  EXPECT_FALSE(catalog_->GetStatistics("vm-1", 0)->has_value());
}

TEST_F(CatalogTest, JobsRoundTripEveryFieldAndSurviveReopen) {
  JobRecord j;
  j.id = "6f1c7a52-3a43-4b8e-9d55-0a8e2b3f4c11";
  j.type = JobType::kUpdateDiskSet;
  j.state = JobState::kException;
  j.percent_complete = 42;
  j.error_code = 32775;
  j.error_description = "invalid state: 'Suspended'";
  j.cancellable = true;
  j.resumable = true;
  j.target = "vm web";
  j.parameters_json = R"({"a":1})";
  j.result_json = R"({"b":2})";
  j.created_ms = 10;
  j.started_ms = 20;
  j.finished_ms = 30;
  j.time_before_removal_s = 7;
  ASSERT_TRUE(catalog_->PutJob(j).ok());
  j.percent_complete = 43;  // upsert
  ASSERT_TRUE(catalog_->PutJob(j).ok());
  Reopen();
  auto got_or = catalog_->GetJob(j.id);
  ASSERT_TRUE(got_or.ok() && got_or->has_value());
  const JobRecord& g = **got_or;
  EXPECT_EQ(g.id, j.id);
  EXPECT_EQ(g.type, j.type);
  EXPECT_EQ(g.state, j.state);
  EXPECT_EQ(g.percent_complete, 43u);
  EXPECT_EQ(g.error_code, j.error_code);
  EXPECT_EQ(g.error_description, j.error_description);
  EXPECT_EQ(g.cancellable, j.cancellable);
  EXPECT_EQ(g.resumable, j.resumable);
  EXPECT_EQ(g.target, j.target);
  EXPECT_EQ(g.parameters_json, j.parameters_json);
  EXPECT_EQ(g.result_json, j.result_json);
  EXPECT_EQ(g.created_ms, j.created_ms);
  EXPECT_EQ(g.started_ms, j.started_ms);
  EXPECT_EQ(g.finished_ms, j.finished_ms);
  EXPECT_EQ(g.time_before_removal_s, j.time_before_removal_s);

  JobRecord older = j;
  older.id = "older";
  older.created_ms = 5;
  ASSERT_TRUE(catalog_->PutJob(older).ok());
  auto list = catalog_->ListJobs();
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].id, "older");
  EXPECT_TRUE(catalog_->DeleteJob("older").ok());
  EXPECT_EQ(catalog_->DeleteJob("older").code(), Code::kNotFound);
  EXPECT_FALSE(catalog_->GetJob("older")->has_value());
  j.percent_complete = 101;
  EXPECT_EQ(catalog_->PutJob(j).code(), Code::kInvalidArgument);
}

TEST_F(CatalogTest, NewerSchemaIsRefusedAndTheFileIsLeftUnchanged) {
  MakeVm("vm-1", "db");
  catalog_.reset();
  RawExec("PRAGMA user_version = " + std::to_string(kCatalogSchemaVersion + 1));
  std::string before = *ReadFile(path_);

  auto c = Catalog::Open(path_);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Code::kFailedPrecondition);
  const std::string m = c.status().message();
  EXPECT_NE(m.find("schema version " + std::to_string(kCatalogSchemaVersion + 1)), std::string::npos) << m;
  EXPECT_NE(m.find("understands up to " + std::to_string(kCatalogSchemaVersion)), std::string::npos) << m;
  EXPECT_NE(m.find("upgrade vmreplica"), std::string::npos) << m;
  EXPECT_EQ(*ReadFile(path_), before);
}

TEST_F(CatalogTest, GarbageFileIsCorruption) {
  catalog_.reset();
  std::string garbage;
  for (int i = 0; i < 4096; ++i) garbage.push_back(static_cast<char>((i * 131 + 7) & 0xff));
  std::string p = dir_ + "/garbage.db";
  ASSERT_TRUE(WriteFileAtomic(p, garbage).ok());
  auto c = Catalog::Open(p);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Code::kCorruption);
  EXPECT_NE(c.status().message().find("not an SQLite database"), std::string::npos) << c.status().message();
  EXPECT_EQ(*ReadFile(p), garbage);
}

TEST_F(CatalogTest, ForeignSqliteDatabaseIsRefused) {
  catalog_.reset();
  std::string p = dir_ + "/other.db";
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(p.c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "CREATE TABLE t (x)", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  auto c = Catalog::Open(p);
  EXPECT_EQ(c.status().code(), Code::kFailedPrecondition);
  EXPECT_NE(c.status().message().find("not a vmreplica catalog"), std::string::npos) << c.status().message();
}

TEST_F(CatalogTest, UnopenablePathIsIOError) {
  auto c = Catalog::Open(dir_ + "/no/such/dir/catalog.db");
  EXPECT_EQ(c.status().code(), Code::kIOError) << c.status().ToString();
}

TEST_F(CatalogTest, RunInTransactionCommitsTogetherOrNotAtAll) {
  Status s = catalog_->RunInTransaction([&]() -> Status {
    VMR_RETURN_IF_ERROR(catalog_->PutVm({"vm-1", "a", ReplicationMode::kReplica, "{}", 1}));
    VMR_RETURN_IF_ERROR(catalog_->PutDisks("vm-1", {{"vm-1", "vda", 1, "/a", "a", 4096, true}}));
    return Status::Internal("injected");
  });
  EXPECT_EQ(s.code(), Code::kInternal);
  EXPECT_TRUE(catalog_->ListVms()->empty());

  s = catalog_->RunInTransaction([&]() -> Status {
    VMR_RETURN_IF_ERROR(catalog_->PutVm({"vm-1", "a", ReplicationMode::kReplica, "{}", 1}));
    // A failing nested change rolls back only itself.
    EXPECT_EQ(catalog_->PutDisks("vm-1", {{"", "x", 1, "", "", 1, true}, {"", "x", 1, "", "", 1, true}}).code(),
              Code::kAlreadyExists);
    return catalog_->PutDisks("vm-1", {{"vm-1", "vda", 1, "/a", "a", 4096, true}});
  });
  ASSERT_TRUE(s.ok()) << s.ToString();
  Reopen();
  EXPECT_EQ(catalog_->ListVms()->size(), 1u);
  EXPECT_EQ(catalog_->ListDisks("vm-1")->size(), 1u);
}

TEST_F(CatalogTest, ConcurrentWritersFromManyThreadsAllLand) {
  constexpr int kThreads = 4, kPerThread = 25;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        JobRecord j;
        j.id = "job-" + std::to_string(t) + "-" + std::to_string(i);
        if (!catalog_->PutJob(j).ok()) ++failures;
        if (!catalog_->ListJobs().ok()) ++failures;
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(catalog_->ListJobs()->size(), static_cast<size_t>(kThreads * kPerThread));
}

}  // namespace
}  // namespace vmreplica
