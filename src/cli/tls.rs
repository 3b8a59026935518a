//! TLS settings every command shares (`--tls-dir`, `--insecure`) and the clients made
//! with them, and `hlstore cert`: the cluster CA and its certificates.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use clap::{Args, Subcommand};
use hlstore_tls::client::ClientTls;
use hlstore_tls::issue::CertSpec;
use hlstore_tls::{Expect, Role, TlsState};

/// TLS options (global: every command takes them).
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// Directory with this side's certificate: ca.crt (the cluster CA), tls.crt, tls.key.
    /// Clients (the CLI, CSI driver, backups) present it to agents; an agent serves and
    /// dials its peers with it (a node certificate for its --id). Default:
    /// $XDG_CONFIG_HOME/hlstore/tls (~/.config/hlstore/tls). `hlstore dev up` prints the
    /// one for its cluster.
    #[arg(long, env = "HLSTORE_TLS_DIR", global = true)]
    pub tls_dir: Option<PathBuf>,
    /// Plaintext gRPC, no certificates: anyone who reaches an agent's port can read,
    /// write and delete every volume. Only for an isolated test machine; agents and
    /// clients must agree.
    #[arg(long, env = "HLSTORE_INSECURE", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
}

static SETTINGS: OnceLock<TlsArgs> = OnceLock::new();
static CLIENT: OnceLock<ClientTls> = OnceLock::new();

pub fn init(args: TlsArgs) {
    let _ = SETTINGS.set(args);
}

fn settings() -> TlsArgs {
    SETTINGS.get().cloned().unwrap_or(TlsArgs { tls_dir: None, insecure: false })
}

/// Where certificates are looked for when no --tls-dir / HLSTORE_TLS_DIR is given.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/etc"));
    base.join("hlstore").join("tls")
}

pub fn insecure() -> bool {
    settings().insecure
}

/// The TLS directory this process uses (given or default).
pub fn dir() -> PathBuf {
    settings().tls_dir.unwrap_or_else(default_dir)
}

/// This process's TLS directory loaded (`None` with --insecure); errors name the file.
pub fn state() -> anyhow::Result<Option<Arc<TlsState>>> {
    if insecure() {
        return Ok(None);
    }
    Ok(Some(TlsState::load(&dir())?))
}

/// How this process's clients reach agents (loaded once per process).
pub fn client() -> anyhow::Result<ClientTls> {
    if let Some(c) = CLIENT.get() {
        return Ok(c.clone());
    }
    let c = match state()? {
        Some(s) => ClientTls::Tls(s),
        None => ClientTls::Insecure,
    };
    Ok(CLIENT.get_or_init(|| c).clone())
}

/// A channel to the agent at `endpoint`, connected now (any node of the cluster).
pub async fn channel(endpoint: &str) -> anyhow::Result<tonic::transport::Channel> {
    let tls = client()?;
    let ep = hlstore_tls::client::endpoint(endpoint)
        .with_context(|| format!("invalid endpoint {endpoint:?}; expected e.g. 127.0.0.1:7400"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    hlstore_tls::client::connect(ep, &tls, Expect::AnyNode).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the node agent: {e}; is `hlstore node` running there? (set --endpoint or HLSTORE_ENDPOINT)"
        )
    })
}

/// A gRPC error as a message: the status's own, plus the transport's reason (a refused
/// certificate, say) when the call failed below gRPC.
pub fn status_message(s: &tonic::Status) -> String {
    use std::error::Error;
    let msg = match s.source() {
        Some(src) => format!("{}: {}", s.message(), hlstore_tls::describe(src)),
        None => s.message().to_string(),
    };
    if insecure()
        && matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
        )
    {
        format!(
            "{msg} (this client runs with --insecure, in plaintext: an agent that serves TLS drops it; use --tls-dir)"
        )
    } else {
        msg
    }
}

/// `hlstore cert` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create the cluster CA (ca.crt, ca.key) in DIR. Keep ca.key off the nodes: it can
    /// mint any identity.
    ///
    /// Example: hlstore cert init --dir /root/hlstore-ca
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "hlstore cluster CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        #[arg(long)]
        json: bool,
    },
    /// Issue a certificate into OUT (ca.crt, tls.crt, tls.key: what --tls-dir wants).
    ///
    /// Roles: node (a node agent, and the CSI node plugin on that node; needs --node),
    /// admin (the CLI, the CSI controller), backup (the backup CronJob: may snapshot and
    /// read volumes, not delete them). Issuing again into OUT renews it; running agents
    /// and CSI drivers pick the new files up within seconds.
    ///
    /// Example: hlstore cert issue --ca-dir /root/hlstore-ca --role node --node pi-1 \
    ///            --dns pi-1.lan --ip 192.168.1.21 --out /etc/hlstore/tls
    #[command(verbatim_doc_comment)]
    Issue {
        /// Directory holding ca.crt and ca.key (from `hlstore cert init`).
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        role: Role,
        /// Node id (role node): the agent's --id.
        #[arg(long)]
        node: Option<String>,
        /// Common name (default: the node id or hlstore-ROLE).
        #[arg(long)]
        name: Option<String>,
        /// Extra DNS names (repeat or comma-separate).
        #[arg(long, value_delimiter = ',')]
        dns: Vec<String>,
        /// Extra IP addresses (repeat or comma-separate).
        #[arg(long, value_delimiter = ',')]
        ip: Vec<IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show what a TLS directory holds: its identity, and whether it loads.
    Show {
        /// The directory (default: --tls-dir / HLSTORE_TLS_DIR, else the default).
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn identity_json(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let s = TlsState::load(dir)?;
    let id = s.identity();
    Ok(serde_json::json!({ "dir": dir, "role": id.role.as_str(), "node": id.node, "name": id.name }))
}

pub fn run_cert(cmd: CertCommand) -> anyhow::Result<()> {
    match cmd {
        CertCommand::Init { dir, name, days, json } => {
            hlstore_tls::issue::init_ca(&dir, &name, days)?;
            if json {
                println!("{}", serde_json::json!({ "ca_dir": dir, "ca": dir.join(hlstore_tls::CA_FILE) }));
            } else {
                println!("CA created: {} (keep {} secret)", dir.join("ca.crt").display(), dir.join("ca.key").display());
            }
        }
        CertCommand::Issue { ca_dir, role, node, name, dns, ip, days, out, json } => {
            let spec = CertSpec { role, node, name, dns, ips: ip, days };
            hlstore_tls::issue::issue(&ca_dir, &spec, &out)?;
            let v = identity_json(&out)?;
            if json {
                println!("{v}");
            } else {
                println!("issued a {} certificate into {}", role, out.display());
            }
        }
        CertCommand::Show { dir, json } => {
            let dir = dir.unwrap_or_else(self::dir);
            let v = identity_json(&dir)?;
            if json {
                println!("{v}");
            } else {
                println!(
                    "{}: role {}{}, name {}",
                    dir.display(),
                    v["role"].as_str().unwrap_or(""),
                    v["node"].as_str().map(|n| format!(", node {n}")).unwrap_or_default(),
                    v["name"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

/// Makes the dev cluster's CA and certificates under `dir` (`ca.crt`, `ca.key`, and one
/// TLS directory per node id, plus `admin/` and `backup/`), keeping whatever exists.
pub fn dev_certificates(dir: &Path, nodes: &[String]) -> anyhow::Result<()> {
    if !dir.join(hlstore_tls::CA_FILE).exists() {
        hlstore_tls::issue::init_ca(dir, "hlstore dev cluster CA", 3650)?;
    }
    let spec = |role, node: Option<&str>| CertSpec {
        role,
        node: node.map(str::to_string),
        name: None,
        dns: if node.is_some() { vec!["localhost".into()] } else { vec![] },
        ips: if node.is_some() { vec![IpAddr::from([127, 0, 0, 1])] } else { vec![] },
        days: 3650,
    };
    let mut todo: Vec<(PathBuf, CertSpec)> =
        vec![(dir.join("admin"), spec(Role::Admin, None)), (dir.join("backup"), spec(Role::Backup, None))];
    todo.extend(nodes.iter().map(|n| (dir.join(n), spec(Role::Node, Some(n)))));
    for (out, spec) in todo {
        if !out.join(hlstore_tls::KEY_FILE).exists() {
            hlstore_tls::issue::issue(dir, &spec, &out)?;
        }
    }
    Ok(())
}
