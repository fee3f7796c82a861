#include "cli/connection.h"

#include <grpcpp/create_channel.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/channel_arguments.h>

#include <cstdlib>

#include "cli/parse.h"
#include "vmreplica/fileutil.h"

namespace vmreplica::cli {
namespace {

Result<std::string> ReadPem(const std::string& path, const char* option) {
  auto text = ReadFile(path, 1u << 20);
  if (!text.ok()) return text.status().WithContext(std::string(option) + " " + path);
  return text;
}

}  // namespace

std::string DefaultSocketPath() {
  const char* env = std::getenv(kSocketEnv);
  return env != nullptr && *env != '\0' ? std::string(env) : std::string(kDefaultSocket);
}

std::string TargetDescription(const ConnectionOptions& options) {
  return options.remote.empty() ? options.socket : options.remote;
}

Result<std::shared_ptr<grpc::Channel>> OpenChannel(const ConnectionOptions& options) {
  if (options.remote.empty()) {
    if (options.socket.empty()) return Status::InvalidArgument("--socket: empty path");
    return grpc::CreateChannel("unix:" + options.socket, grpc::InsecureChannelCredentials());
  }
  VMR_ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(options.remote));
  if (options.ca_file.empty() || options.cert_file.empty() || options.key_file.empty()) {
    return Status::InvalidArgument("--remote needs --ca, --cert and --key (PEM files)");
  }
  grpc::SslCredentialsOptions ssl;
  VMR_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPem(options.ca_file, "--ca"));
  VMR_ASSIGN_OR_RETURN(ssl.pem_cert_chain, ReadPem(options.cert_file, "--cert"));
  VMR_ASSIGN_OR_RETURN(ssl.pem_private_key, ReadPem(options.key_file, "--key"));
  grpc::ChannelArguments args;
  args.SetSslTargetNameOverride(hp.host);
  const std::string target =
      hp.host.find(':') != std::string::npos ? "[" + hp.host + "]:" + std::to_string(hp.port) : options.remote;
  return grpc::CreateCustomChannel(target, grpc::SslCredentials(ssl), args);
}

}  // namespace vmreplica::cli
