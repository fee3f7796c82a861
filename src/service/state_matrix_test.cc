// Every illegal state answers 32775 (docs/failover.md section 18.3): the real
// ControlService in-process (gRPC over a unix socket) with a real SQLite
// catalog, job engine, replication engine and failover manager. For each
// state 0..21 a VM and its relationship are written as a primary and as a
// replica, and each failover-family method is called. The states each method
// allows are written here from the reference (../shared/reference/
// hyperv-replica.md) and docs/failover.md, not taken from CheckTransition.
//
// Allowed cells are not asserted to succeed (the VM here has no disks, no
// store and no peer): only that the answer is not the table's refusal. Calls
// that could start a job are given a point id that does not exist, so they
// answer before a job; a job that does start is waited for before the next
// cell is written.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <set>
#include <string>

#include "service/control_service.h"
#include "vmreplica/catalog.h"
#include "vmreplica/control.grpc.pb.h"
#include "vmreplica/failover.h"
#include "vmreplica/jobs.h"
#include "vmreplica/model/enums.h"
#include "vmreplica/replication.h"
#include "vmreplica/transfer.h"
#include "vmreplica/vm_binding.h"

namespace vmreplica::service {
namespace {

constexpr uint32_t kInvalidState = 32775;
constexpr const char* kVmId = "6a1f0c2e-5b7d-4e9a-8c3f-0d2b4a6e8f10";

class StateMatrixTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmr-matrix-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto c = Catalog::Open(dir_ + "/catalog.db");
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    catalog_ = std::move(c).value();
    jobs_ = std::make_unique<JobEngine>(catalog_.get(), JobEngineOptions{});
    ReplicaManagerOptions ropts;
    ropts.staging.catalog = catalog_.get();
    replicas_ = std::make_unique<ReplicaManager>(catalog_.get(), ropts);
    ReplicationEngineOptions eopts;
    eopts.run_dir = dir_ + "/run";
    // No peer exists: every connection attempt is "not reachable".
    eopts.open_channel = [](const std::string& host, uint16_t) -> Result<std::shared_ptr<grpc::Channel>> {
      return Status::Unavailable("no replica server " + host + " in this test");
    };
    engine_ = std::make_unique<ReplicationEngine>(catalog_.get(), jobs_.get(), eopts);
    FailoverOptions fopts;
    fopts.state_dir = dir_;
    fopts.ask_primary = [](const std::string&, const std::string&) -> Result<ReplicaClient::PrimaryVmState> {
      return Status::Unavailable("no primary in this test");
    };
    failover_ = std::make_unique<FailoverManager>(catalog_.get(), jobs_.get(), replicas_.get(), fopts);
    ASSERT_TRUE(failover_->Start().ok());
    env_.catalog = catalog_.get();
    env_.jobs = jobs_.get();
    env_.replication = engine_.get();
    env_.failover = failover_.get();
    env_.host_name = "matrix.test";
    service_ = std::make_unique<ControlService>(&env_, /*remote=*/false);
    grpc::ServerBuilder b;
    b.AddListeningPort("unix:" + dir_ + "/control.sock", grpc::InsecureServerCredentials());
    b.RegisterService(service_.get());
    server_ = b.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::ReplicationService::NewStub(
        grpc::CreateChannel("unix:" + dir_ + "/control.sock", grpc::InsecureChannelCredentials()));

    VmDefinition def;
    def.name = "matrix";
    def.uuid = kVmId;
    def.memory_mib = 512;
    def.vcpus = 1;
    def.kind = VmSourceKind::kOffline;
    def.disks.push_back(VmDiskSpec{"vda", "vda", dir_ + "/vda.qcow2", "qcow2", 64u << 20});
    ASSERT_TRUE(def.Validate().ok());
    definition_json_ = def.ToJson().dump();
  }

  void TearDown() override {
    if (server_) server_->Shutdown();
    failover_->Stop();
    engine_->Stop();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // The VM and its relationship 0 in `mode`, state `state`.
  void Put(ReplicationMode mode, ReplicationState state) {
    VmRecord vm;
    vm.id = kVmId;
    vm.name = "matrix";
    vm.mode = mode;
    vm.definition_json = definition_json_;
    ASSERT_TRUE(catalog_->PutVm(vm).ok());
    RelationshipRecord rel;
    rel.vm_id = kVmId;
    rel.index = 0;
    rel.local_mode = mode;
    rel.state = state;
    rel.settings.recovery_connection_point = "replica.matrix.test";
    rel.settings.recovery_server_port = 443;
    rel.settings.primary_connection_point = "primary.matrix.test:443";
    rel.generation_id = "00112233445566778899aabbccddeeff";
    rel.sequence = 3;
    ASSERT_TRUE(catalog_->PutRelationship(rel).ok());
  }

  // Waits for a job the answer started, so that it cannot change the
  // relationship after the next cell is written.
  void Settle(const v1::MethodResult& r) {
    if (r.return_value() != 4096 || r.job().id().empty()) return;
    for (int i = 0; i < 60; ++i) {
      grpc::ClientContext ctx;
      v1::WaitJobRequest req;
      req.set_id(r.job().id());
      req.set_timeout_ms(1000);
      v1::JobResponse resp;
      ASSERT_TRUE(stub_->WaitJob(&ctx, req, &resp).ok());
      if (IsFinal(static_cast<JobState>(resp.job().job_state()))) return;
    }
    FAIL() << "job " << r.job().id() << " did not end";
  }

  using Call = std::function<v1::MethodResult()>;

  std::map<std::string, Call> Methods() {
    std::map<std::string, Call> m;
    m["RequestReplicationStateChange 4"] = [this] {
      grpc::ClientContext ctx;
      v1::StateChangeRequest req;
      req.set_vm(kVmId);
      req.set_requested_state(4);
      v1::MethodResponse resp;
      EXPECT_TRUE(stub_->RequestReplicationStateChange(&ctx, req, &resp).ok());
      return resp.result();
    };
    m["RevertFailover"] = [this] {
      grpc::ClientContext ctx;
      v1::VmRequest req;
      req.set_vm(kVmId);
      v1::MethodResponse resp;
      EXPECT_TRUE(stub_->RevertFailover(&ctx, req, &resp).ok());
      return resp.result();
    };
    m["CommitFailover"] = [this] {
      grpc::ClientContext ctx;
      v1::VmRequest req;
      req.set_vm(kVmId);
      v1::MethodResponse resp;
      EXPECT_TRUE(stub_->CommitFailover(&ctx, req, &resp).ok());
      return resp.result();
    };
    m["InitiateFailover"] = [this] {
      grpc::ClientContext ctx;
      v1::FailoverRequest req;
      req.set_vm(kVmId);
      req.set_recovery_point_id("no-such-point");
      v1::MethodResponse resp;
      EXPECT_TRUE(stub_->InitiateFailover(&ctx, req, &resp).ok());
      return resp.result();
    };
    m["TestReplicaSystem"] = [this] {
      grpc::ClientContext ctx;
      v1::FailoverRequest req;
      req.set_vm(kVmId);
      req.set_recovery_point_id("no-such-point");
      v1::MethodResponse resp;
      EXPECT_TRUE(stub_->TestReplicaSystem(&ctx, req, &resp).ok());
      return resp.result();
    };
    m["ReverseReplicationRelationship"] = [this] {
      grpc::ClientContext ctx;
      v1::VmSettingsRequest req;
      req.set_vm(kVmId);
      v1::MethodResponse resp;
      EXPECT_TRUE(stub_->ReverseReplicationRelationship(&ctx, req, &resp).ok());
      return resp.result();
    };
    m["InitiateFailback"] = [this] {
      grpc::ClientContext ctx;
      v1::FailbackRequest req;
      req.set_vm(kVmId);
      v1::MethodResponse resp;
      EXPECT_TRUE(stub_->InitiateFailback(&ctx, req, &resp).ok());
      return resp.result();
    };
    m["ChangeReplicationModeToPrimary"] = [this] {
      grpc::ClientContext ctx;
      v1::VmRelationshipRequest req;
      req.set_vm(kVmId);
      req.set_relationship_index(0);
      v1::MethodResponse resp;
      EXPECT_TRUE(stub_->ChangeReplicationModeToPrimary(&ctx, req, &resp).ok());
      return resp.result();
    };
    return m;
  }

  void Walk(ReplicationMode mode, const std::map<std::string, std::set<int>>& allowed) {
    const auto methods = Methods();
    ASSERT_EQ(methods.size(), allowed.size());
    for (const auto& [name, call] : methods) {
      const auto it = allowed.find(name);
      ASSERT_NE(it, allowed.end()) << name;
      for (int state = 0; state <= 21; ++state) {
        const auto s = static_cast<ReplicationState>(state);
        Put(mode, s);
        if (HasFatalFailure()) return;
        const v1::MethodResult r = call();
        const std::string where = std::string(Name(mode)) + " in state " + std::to_string(state) + ": " + name +
                                  " answered " + std::to_string(r.return_value()) + " " + r.error_description();
        if (it->second.count(state) == 0) {
          EXPECT_EQ(r.return_value(), kInvalidState) << where;
          EXPECT_FALSE(r.error_description().empty()) << where;
          if (mode == ReplicationMode::kReplica) {
            // The replica's refusals come from its table and name the state.
            EXPECT_NE(r.error_description().find("(" + std::to_string(state) + ")"), std::string::npos) << where;
          }
        } else {
          EXPECT_EQ(r.error_description().find("is not allowed in state"), std::string::npos) << where;
        }
        Settle(r);
        if (HasFatalFailure()) return;
      }
    }
  }

  std::string dir_;
  std::string definition_json_;
  std::unique_ptr<Catalog> catalog_;
  std::unique_ptr<JobEngine> jobs_;
  std::unique_ptr<ReplicaManager> replicas_;
  std::unique_ptr<ReplicationEngine> engine_;
  std::unique_ptr<FailoverManager> failover_;
  ServiceEnv env_;
  std::unique_ptr<ControlService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::ReplicationService::Stub> stub_;
};

TEST_F(StateMatrixTest, OnTheReplicaEveryStateTheReferenceForbidsAnswers32775) {
  Walk(ReplicationMode::kReplica, {
                                      // Reference: "state 3, 7, 10 or 15".
                                      {"InitiateFailover", {3, 7, 10, 15}},
                                      // Reference: "requires state 5" (commit); revert undoes 5.
                                      {"RevertFailover", {5}},
                                      {"CommitFailover", {5}},
                                      // docs/failover.md section 2 (the reference: "not in states 10 or 15").
                                      {"TestReplicaSystem", {3, 7, 8, 9, 11, 16}},
                                      // docs/failover.md sections 9.4, 13.1, 13.2, 13.3.
                                      {"ReverseReplicationRelationship", {5, 6}},
                                      {"InitiateFailback", {5, 6}},
                                      {"ChangeReplicationModeToPrimary", {6}},
                                      // A planned failover is prepared on the primary only.
                                      {"RequestReplicationStateChange 4", {}},
                                  });
}

TEST_F(StateMatrixTest, OnThePrimaryEveryStateTheReferenceForbidsAnswers32775) {
  Walk(ReplicationMode::kPrimary, {
                                      // Reference: prepare from Replicating; RevertFailover on the
                                      // primary cancels it in 4.
                                      {"RequestReplicationStateChange 4", {3}},
                                      {"RevertFailover", {4}},
                                      // The replica's methods: never on the primary.
                                      {"InitiateFailover", {}},
                                      {"CommitFailover", {}},
                                      {"TestReplicaSystem", {}},
                                      {"ReverseReplicationRelationship", {}},
                                      {"InitiateFailback", {}},
                                      {"ChangeReplicationModeToPrimary", {}},
                                  });
}

}  // namespace
}  // namespace vmreplica::service
