// jobs (Get-/Wait-/Stop-Job on the daemon's jobs) and cert (the lab PKI,
// local; and the daemon's certificates).
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/format.h"
#include "cli/verbs.h"
#include "vmreplica/fileutil.h"
#include "vmreplica/security.h"

namespace vmreplica::cli {
namespace {

// ---------------------------------------------------------------- jobs

void AddJobs(Registry& reg) {
  reg.Group("jobs", "the daemon's jobs (CIM_ConcreteJob)");
  reg.Add("jobs list", "list the jobs the daemon remembers (ListJobs)", {"ListJobs"}, [](Session& s) {
    return s.Invoke(VMR_RPC(ListJobs), v1::Empty(), [&s](const v1::JobsResponse& r) {
      Table t({"Id", "Type", "State", "%", "ErrorCode", "Target", "Elapsed"});
      for (const auto& j : r.jobs()) {
        t.AddRow({j.id(), NameOrNumber<JobType>(j.job_type()), NameOrNumber<JobState>(j.job_state()),
                  std::to_string(j.percent_complete()), std::to_string(j.error_code()), j.target(),
                  FormatElapsedMs(j.elapsed_ms())});
      }
      s.out() << t.Render();
    });
  });

  auto get_id = std::make_shared<std::string>();
  reg.Add("jobs get", "show one job and, once Completed, its result (GetJob)", {"GetJob"},
          [get_id](Session& s) {
            v1::JobRequest request;
            request.set_id(*get_id);
            return s.Invoke(VMR_RPC(GetJob), request,
                            [&s](const v1::JobResponse& r) { s.PrintJob(r.job(), /*with_result=*/true); });
          })
      ->add_option("ID", *get_id, "job id (InstanceID)")
      ->required();

  auto wait_id = std::make_shared<std::string>();
  reg.Add("jobs wait", "wait for a job to end; fails when the job does (WaitJob)", {"WaitJob"},
          [wait_id](Session& s) { return s.WaitForJob("", *wait_id); })
      ->add_option("ID", *wait_id, "job id (InstanceID)")
      ->required();

  auto cancel_id = std::make_shared<std::string>();
  reg.Add("jobs cancel", "ask a cancellable job to stop (CancelJob)", {"CancelJob"},
          [cancel_id](Session& s) {
            v1::JobRequest request;
            request.set_id(*cancel_id);
            return s.Invoke(VMR_RPC(CancelJob), request);
          })
      ->add_option("ID", *cancel_id, "job id (InstanceID)")
      ->required();
}

// ---------------------------------------------------------------- cert

nlohmann::ordered_json CertificateJson(const security::CertificateInfo& c) {
  return {{"subject", c.subject},
          {"subject_cn", c.subject_cn},
          {"issuer", c.issuer},
          {"dns_names", c.dns_names},
          {"ip_addresses", c.ip_addresses},
          {"serial_hex", c.serial_hex},
          {"thumbprint_sha1", c.thumbprint_sha1},
          {"sha256_hex", c.sha256_hex},
          {"not_before_unix", c.not_before_unix},
          {"not_after_unix", c.not_after_unix},
          {"server_auth", c.server_auth},
          {"client_auth", c.client_auth},
          {"is_ca", c.is_ca}};
}

void AddCertificateRows(PropertyTable& t, const security::CertificateInfo& c) {
  t.Add("Subject", c.subject)
      .Add("Issuer", c.issuer)
      .Add("DnsNames", Join(c.dns_names))
      .Add("IpAddresses", Join(c.ip_addresses))
      .Add("SerialNumber", c.serial_hex)
      .Add("Thumbprint", c.thumbprint_sha1)
      .Add("Sha256", c.sha256_hex)
      .Add("NotBefore", FormatUnixSeconds(c.not_before_unix))
      .Add("NotAfter", FormatUnixSeconds(c.not_after_unix))
      .Add("ServerAuthentication", std::string(BoolText(c.server_auth)))
      .Add("ClientAuthentication", std::string(BoolText(c.client_auth)))
      .Add("IsCA", std::string(BoolText(c.is_ca)));
}

// Prints what was just written to `cert_path` / `key_path`.
int ReportCreated(Session& s, const std::string& cert_path, const std::string& key_path) {
  auto pem = ReadFile(cert_path);
  auto info = pem.ok() ? security::InspectCertificatePem(*pem) : Result<security::CertificateInfo>(pem.status());
  if (!info.ok()) return s.Error("cannot read back " + cert_path + ": " + info.status().message(), kExitFailed);
  if (s.json()) {
    auto j = CertificateJson(*info);
    j["cert_path"] = cert_path;
    j["key_path"] = key_path;
    s.out() << j.dump() << "\n";
    return kExitOk;
  }
  PropertyTable t;
  t.Add("CertificateFile", cert_path).Add("KeyFile", key_path);
  AddCertificateRows(t, *info);
  s.out() << t.Render();
  return kExitOk;
}

struct CertOptions {
  std::string cert, key, ca_cert, ca_key, cn, file;
  std::vector<std::string> sans;
  int days = 0;
};

// Creates the directories the output files go into (0700: they hold keys).
Status MakeParents(const std::vector<std::string>& files) {
  for (const auto& f : files) {
    std::string dir = std::filesystem::path(f).parent_path().string();
    if (dir.empty() || std::filesystem::is_directory(dir)) continue;
    VMR_RETURN_IF_ERROR(MakeDirs(dir, 0700));
  }
  return Status::Ok();
}

void AddCert(Registry& reg) {
  reg.Group("cert", "certificates: a lab PKI (local) and the daemon's certificates");

  auto ca = std::make_shared<CertOptions>();
  ca->days = 3650;
  CLI::App* c = reg.Add("cert ca", "create a self-signed lab CA (local, no daemon)", {}, [ca](Session& s) {
    Status st = MakeParents({ca->cert, ca->key});
    if (st.ok()) st = security::CreateLabCa(ca->cert, ca->key, ca->cn, ca->days);
    if (!st.ok()) return s.Error("cert ca: " + st.message(), kExitFailed);
    return ReportCreated(s, ca->cert, ca->key);
  });
  c->add_option("--cert", ca->cert, "CA certificate file to write (PEM)")->required();
  c->add_option("--key", ca->key, "CA private key file to write (PEM, mode 0600)")->required();
  c->add_option("--cn", ca->cn, "common name")->required();
  c->add_option("--days", ca->days, "validity in days")->capture_default_str()->check(CLI::Range(1, 36500));

  auto issue = std::make_shared<CertOptions>();
  issue->days = 825;
  CLI::App* i =
      reg.Add("cert issue", "issue a host certificate (serverAuth + clientAuth) from a lab CA (local, no daemon)", {},
              [issue](Session& s) {
                Status st = MakeParents({issue->cert, issue->key});
                if (st.ok()) {
                  st = security::IssueHostCertificate(issue->ca_cert, issue->ca_key, issue->cn, issue->sans,
                                                      issue->cert, issue->key, issue->days);
                }
                if (!st.ok()) return s.Error("cert issue: " + st.message(), kExitFailed);
                return ReportCreated(s, issue->cert, issue->key);
              });
  i->add_option("--ca-cert", issue->ca_cert, "CA certificate (PEM)")->required();
  i->add_option("--ca-key", issue->ca_key, "CA private key (PEM)")->required();
  i->add_option("--cn", issue->cn, "common name: the host's name")->required();
  i->add_option("--san", issue->sans, "subject alternative name, DNS name or IP address (repeatable)");
  i->add_option("--cert", issue->cert, "certificate file to write (PEM)")->required();
  i->add_option("--key", issue->key, "private key file to write (PEM, mode 0600)")->required();
  i->add_option("--days", issue->days, "validity in days (clamped to the CA's)")
      ->capture_default_str()
      ->check(CLI::Range(1, 36500));

  auto show = std::make_shared<CertOptions>();
  reg.Add("cert show", "print what a PEM certificate file says (local, no daemon)", {},
          [show](Session& s) {
            auto pem = ReadFile(show->file);
            if (!pem.ok()) return s.Error("cert show: " + pem.status().message(), kExitFailed);
            auto chain = security::InspectCertificateChainPem(*pem);
            if (!chain.ok()) return s.Error("cert show: " + show->file + ": " + chain.status().message(), kExitFailed);
            for (size_t n = 0; n < chain->size(); ++n) {
              if (s.json()) {
                s.out() << CertificateJson((*chain)[n]).dump() << "\n";
                continue;
              }
              if (n > 0) s.out() << "\n";
              PropertyTable t;
              AddCertificateRows(t, (*chain)[n]);
              s.out() << t.Render();
            }
            return kExitOk;
          })
      ->add_option("FILE", show->file, "PEM file (every certificate in it is shown)")
      ->required();

  reg.Add("cert list", "the certificates the daemon uses (GetSystemCertificates)", {"GetSystemCertificates"},
          [](Session& s) {
            return s.Invoke(VMR_RPC(GetSystemCertificates), v1::Empty(), [&s](const v1::CertificatesResponse& r) {
              Table t({"Role", "Subject", "Thumbprint", "NotAfter", "Names", "EKU"});
              for (const auto& c : r.certificates()) {
                std::vector<std::string> names(c.dns_names().begin(), c.dns_names().end());
                names.insert(names.end(), c.ip_addresses().begin(), c.ip_addresses().end());
                std::vector<std::string> eku;
                if (c.server_authentication()) eku.push_back("server");
                if (c.client_authentication()) eku.push_back("client");
                t.AddRow({c.role(), c.subject(), c.thumbprint(), FormatUnixSeconds(c.not_after_unix()), Join(names),
                          Join(eku, "+")});
              }
              s.out() << t.Render();
            });
          });
}

}  // namespace

void AddJobVerbs(Registry& reg) { AddJobs(reg); }
void AddCertVerbs(Registry& reg) { AddCert(reg); }

}  // namespace vmreplica::cli
