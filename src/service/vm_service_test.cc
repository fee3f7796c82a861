// VmService over an in-process gRPC server (unix socket) with a real
// catalog, binding VMs that a real qemu-storage-daemon serves.
#include "service/vm_service.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <sstream>

#include "cli/cli.h"
#include "qemu/qemu_test_util.h"
#include "vmreplica/model/enums.h"
#include "vmreplica/qmp.h"

namespace vmreplica::service {
namespace {

using testutil::TempDir;

class VmServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto c = Catalog::Open(dir_.path() + "/catalog.db");
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    catalog_ = std::move(c).value();
    env_.catalog = catalog_.get();
    env_.host_name = "primary.test";
    local_ = std::make_unique<VmService>(&env_, false);
    remote_ = std::make_unique<VmService>(&env_, true);
    local_stub_ = Serve(local_.get(), dir_.path() + "/local.sock", &local_server_);
    remote_stub_ = Serve(remote_.get(), dir_.path() + "/remote.sock", &remote_server_);

    image_ = dir_.path() + "/vda.qcow2";
    auto r = testutil::Run("qemu-img create -q -f qcow2 " + image_ + " 16M");
    ASSERT_EQ(r.exit_code, 0) << "qemu-img (package qemu-utils) is required: " << r.output;
  }
  void TearDown() override {
    if (local_server_) local_server_->Shutdown();
    if (remote_server_) remote_server_->Shutdown();
  }

  std::unique_ptr<v1::VmInventory::Stub> Serve(VmService* service, const std::string& socket,
                                               std::unique_ptr<grpc::Server>* server) {
    grpc::ServerBuilder b;
    b.AddListeningPort("unix:" + socket, grpc::InsecureServerCredentials());
    b.RegisterService(service);
    *server = b.BuildAndStart();
    EXPECT_NE(*server, nullptr);
    return v1::VmInventory::NewStub(grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials()));
  }

  v1::AddVmRequest OfflineRequest(const std::string& name) {
    v1::AddVmRequest req;
    req.set_kind(3);
    req.set_name(name);
    req.set_memory_mib(512);
    req.set_vcpus(2);
    auto* d = req.add_disks();
    d->set_disk("vda");
    d->set_target(image_);
    return req;
  }

  v1::VmResponse Add(const v1::AddVmRequest& req) {
    grpc::ClientContext ctx;
    v1::VmResponse resp;
    EXPECT_TRUE(local_stub_->AddVm(&ctx, req, &resp).ok());
    return resp;
  }
  uint32_t Remove(const std::string& vm, v1::VmInventory::Stub* stub = nullptr) {
    grpc::ClientContext ctx;
    v1::VmRequest req;
    req.set_vm(vm);
    v1::MethodResponse resp;
    EXPECT_TRUE((stub ? stub : local_stub_.get())->RemoveVm(&ctx, req, &resp).ok());
    return resp.result().return_value();
  }
  v1::VmResponse Get(const std::string& vm) {
    grpc::ClientContext ctx;
    v1::VmRequest req;
    req.set_vm(vm);
    v1::VmResponse resp;
    EXPECT_TRUE(local_stub_->GetVm(&ctx, req, &resp).ok());
    return resp;
  }

  TempDir dir_{"vmsvc"};
  std::string image_;
  std::unique_ptr<Catalog> catalog_;
  ServiceEnv env_;
  std::unique_ptr<VmService> local_, remote_;
  std::unique_ptr<grpc::Server> local_server_, remote_server_;
  std::unique_ptr<v1::VmInventory::Stub> local_stub_, remote_stub_;
};

TEST_F(VmServiceTest, AddGetListRemoveAnOfflineVm) {
  v1::VmResponse added = Add(OfflineRequest("db01"));
  ASSERT_EQ(added.result().return_value(), 0u) << added.result().error_description();
  const std::string id = added.vm().id();
  EXPECT_EQ(added.vm().name(), "db01");
  EXPECT_EQ(added.vm().kind(), 3u);
  ASSERT_EQ(added.vm().disks_size(), 1);
  EXPECT_EQ(added.vm().disks(0).size_bytes(), 16u << 20);
  EXPECT_EQ(added.vm().disks(0).path(), image_);

  // Stored in the catalog, VM and disks.
  auto rec = catalog_->GetVm(id);
  ASSERT_TRUE(rec.ok() && rec->has_value());
  EXPECT_EQ((*rec)->name, "db01");
  auto disks = catalog_->ListDisks(id);
  ASSERT_TRUE(disks.ok());
  ASSERT_EQ(disks->size(), 1u);
  EXPECT_EQ((*disks)[0].path, image_);
  EXPECT_EQ((*disks)[0].size_bytes, 16u << 20);

  EXPECT_EQ(Get("db01").vm().id(), id);
  EXPECT_EQ(Get(id).vm().name(), "db01");
  EXPECT_EQ(Get("nobody").result().return_value(), Number(ReturnCode::kFileNotFound));

  // The same name twice is refused.
  EXPECT_EQ(Add(OfflineRequest("db01")).result().return_value(), Number(ReturnCode::kInvalidParameter));

  grpc::ClientContext ctx;
  v1::VmsResponse list;
  ASSERT_TRUE(local_stub_->ListVms(&ctx, v1::Empty(), &list).ok());
  ASSERT_EQ(list.vms_size(), 1);
  EXPECT_EQ(list.vms(0).id(), id);

  // A relationship blocks removal (32775).
  RelationshipRecord rel;
  rel.vm_id = id;
  rel.index = 0;
  ASSERT_TRUE(catalog_->PutRelationship(rel).ok());
  EXPECT_EQ(Remove("db01"), Number(ReturnCode::kInvalidState));
  ASSERT_TRUE(catalog_->DeleteRelationship(id, 0).ok());
  EXPECT_EQ(Remove("db01"), 0u);
  auto gone = catalog_->GetVm(id);
  ASSERT_TRUE(gone.ok());
  EXPECT_FALSE(gone->has_value());
  EXPECT_EQ(Remove("db01"), Number(ReturnCode::kFileNotFound));
}

TEST_F(VmServiceTest, BadRequestsAreRefusedWithTheirCodes) {
  v1::AddVmRequest req = OfflineRequest("x");
  req.set_kind(9);
  EXPECT_EQ(Add(req).result().return_value(), Number(ReturnCode::kInvalidParameter));
  req = OfflineRequest("x");
  req.mutable_disks(0)->set_target(dir_.path() + "/missing.qcow2");
  EXPECT_EQ(Add(req).result().return_value(), Number(ReturnCode::kFileNotFound));
  req = OfflineRequest("x");
  req.set_memory_mib(0);
  auto r = Add(req);
  EXPECT_EQ(r.result().return_value(), Number(ReturnCode::kInvalidParameter));
  EXPECT_NE(r.result().error_description().find("memory_mib"), std::string::npos);
  v1::AddVmRequest qmp;
  qmp.set_kind(1);
  qmp.set_name("q");
  qmp.set_qmp_socket(dir_.path() + "/nobody.sock");
  auto* d = qmp.add_disks();
  d->set_disk("vda");
  d->set_target("vda");
  EXPECT_EQ(Add(qmp).result().return_value(), Number(ReturnCode::kSystemNotAvailable));
  auto list = catalog_->ListVms();
  ASSERT_TRUE(list.ok());
  EXPECT_TRUE(list->empty()) << "nothing is stored for a refused request";
}

TEST_F(VmServiceTest, AddsAQmpVmThroughQemu) {
  std::string run = dir_.path() + "/qsd";
  std::filesystem::create_directory(run);
  QsdOptions o;
  o.run_dir = run;
  o.disks = {{"vda", image_, "qcow2", false}};
  QsdProcess qsd(o);
  Status s = qsd.Start();
  ASSERT_TRUE(s.ok()) << "qemu-storage-daemon is required: " << s.ToString();
  v1::AddVmRequest req;
  req.set_kind(1);
  req.set_name("live01");
  req.set_qmp_socket(qsd.qmp_socket());
  req.set_memory_mib(1024);
  req.set_vcpus(1);
  auto* d = req.add_disks();
  d->set_disk("vda");
  d->set_target("vda");
  auto resp = Add(req);
  ASSERT_EQ(resp.result().return_value(), 0u) << resp.result().error_description();
  EXPECT_EQ(resp.vm().qmp_socket(), qsd.qmp_socket());
  EXPECT_EQ(resp.vm().disks(0).node_name(), "vda");
  d->set_target("no-node");
  req.set_name("live02");
  EXPECT_EQ(Add(req).result().return_value(), Number(ReturnCode::kFileNotFound));
}

TEST_F(VmServiceTest, RemoteCallerWithoutAdminPrincipalIsDenied) {
  grpc::ClientContext ctx;
  v1::AddVmRequest req = OfflineRequest("r");
  v1::VmResponse resp;
  ASSERT_TRUE(remote_stub_->AddVm(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.result().return_value(), Number(ReturnCode::kAccessDenied));
  grpc::ClientContext ctx2;
  v1::VmsResponse list;
  ASSERT_TRUE(remote_stub_->ListVms(&ctx2, v1::Empty(), &list).ok());
  EXPECT_EQ(list.result().return_value(), Number(ReturnCode::kAccessDenied));
  EXPECT_EQ(Remove("r", remote_stub_.get()), Number(ReturnCode::kAccessDenied));
  auto vms = catalog_->ListVms();
  ASSERT_TRUE(vms.ok());
  EXPECT_TRUE(vms->empty());
}

// The `vmreplica vm ...` verbs against this in-process service.
TEST_F(VmServiceTest, CliVerbsAddListGetRemove) {
  auto cli = [&](std::vector<std::string> args, std::string* out) {
    std::vector<std::string> argv = {"vmreplica", "--socket", dir_.path() + "/local.sock"};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<const char*> c;
    for (const auto& a : argv) c.push_back(a.c_str());
    std::ostringstream o, e;
    int rc = cli::Main(static_cast<int>(c.size()), c.data(), o, e, false);
    *out = o.str() + e.str();
    return rc;
  };
  std::string out;
  ASSERT_EQ(cli({"vm", "add", "app01", "--image", "vda=" + image_, "--memory", "768", "--vcpus", "3"}, &out), 0) << out;
  EXPECT_NE(out.find("app01"), std::string::npos) << out;
  EXPECT_NE(out.find("768"), std::string::npos) << out;
  ASSERT_EQ(cli({"vm", "list"}, &out), 0) << out;
  EXPECT_NE(out.find("app01"), std::string::npos) << out;
  EXPECT_NE(out.find("offline"), std::string::npos) << out;
  ASSERT_EQ(cli({"--json", "vm", "get", "app01"}, &out), 0) << out;
  auto j = nlohmann::json::parse(out.substr(0, out.find('\n')), nullptr, false);
  ASSERT_TRUE(j.is_object()) << out;
  EXPECT_EQ(j["vm"]["name"], "app01");
  EXPECT_EQ(j["vm"]["vcpus"], 3);
  EXPECT_EQ(j["vm"]["disks"][0]["path"], image_);
  // A missing image is a failed method (exit 1) naming the file.
  EXPECT_EQ(
      cli({"vm", "add", "app02", "--image", "vda=" + dir_.path() + "/nope.qcow2", "--memory", "1", "--vcpus", "1"},
          &out),
      1);
  EXPECT_NE(out.find("nope.qcow2"), std::string::npos) << out;
  ASSERT_EQ(cli({"vm", "remove", "app01"}, &out), 0) << out;
  EXPECT_EQ(cli({"vm", "get", "app01"}, &out), 1) << out;
}

}  // namespace
}  // namespace vmreplica::service
