//! `--config`: a KubeProxyConfiguration-style YAML file
//! (`apiVersion: kubeproxy.config.k8s.io/v1alpha1`,
//! `kind: KubeProxyConfiguration`). The fields that apply to this agent are
//! read; kube-proxy fields that do not apply are accepted with a warning (a
//! kubeadm-made file works); anything else is an error naming the field and
//! its value. This agent's own settings live under `kubeProxyEbpf`.
//! Command-line flags (and their environment variables) override the file.

use std::path::{Path, PathBuf};

use clap::{ArgMatches, ValueEnum, parser::ValueSource};
use serde_yaml::Value;

use crate::{
    cli::{Args, LogFormat, Mode, XdpMode, parse_duration},
    dataplane::ebpf::capacity::Sizing,
};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";
/// The key of this agent's own settings.
pub const EXTENSION: &str = "kubeProxyEbpf";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("reading {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: not YAML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: field {field} = {value}: {reason}")]
    Field {
        path: PathBuf,
        field: String,
        value: String,
        reason: String,
    },
}

/// Settings from the file; None: not set there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub mode: Option<Mode>,
    pub cluster_cidr: Option<Vec<String>>,
    pub hostname_override: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub nodeport_addresses: Option<Vec<String>>,
    pub kubeconfig: Option<PathBuf>,
    pub sync_period: Option<std::time::Duration>,
    // kubeProxyEbpf:
    pub bpffs_path: Option<PathBuf>,
    pub socket_lb: Option<bool>,
    pub cgroup_path: Option<PathBuf>,
    pub pod_devices: Option<Vec<String>>,
    pub devices: Option<Vec<String>>,
    pub xdp_mode: Option<XdpMode>,
    pub maglev_table_size: Option<u32>,
    pub maglev_max_table_size: Option<u32>,
    pub maglev_map_max: Option<Sizing>,
    pub bpf_lb_map_max: Option<Sizing>,
    pub bpf_lb_backend_map_max: Option<Sizing>,
    pub bpf_lb_slot_map_max: Option<Sizing>,
    pub bpf_ct_map_max: Option<Sizing>,
    pub bpf_affinity_map_max: Option<Sizing>,
    pub bpf_source_ranges_map_max: Option<Sizing>,
    pub dsr: Option<bool>,
    pub source_ranges_all: Option<bool>,
    pub log_format: Option<LogFormat>,
}

/// kube-proxy v1alpha1 fields this agent does not use (accepted, warned).
const IGNORED: &[&str] = &[
    "featureGates",
    "logging",
    "bindAddress",
    "bindAddressHardFail",
    "enableProfiling",
    "showHiddenMetricsForVersion",
    "iptables",
    "ipvs",
    "nftables",
    "winkernel",
    "detectLocalMode",
    "detectLocal",
    "oomScoreAdj",
    "conntrack",
    "configSyncPeriod",
    "minSyncPeriod",
    "portRange",
    "windowsRunAsService",
];
const IGNORED_CLIENT: &[&str] = &["acceptContentTypes", "contentType", "qps", "burst"];

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

struct Reader<'a> {
    path: &'a Path,
    warnings: Vec<String>,
}

impl Reader<'_> {
    fn err(&self, field: &str, v: &Value, reason: impl Into<String>) -> ConfigError {
        ConfigError::Field {
            path: self.path.to_owned(),
            field: field.to_owned(),
            value: show(v),
            reason: reason.into(),
        }
    }

    fn string(&self, field: &str, v: &Value) -> Result<String, ConfigError> {
        v.as_str()
            .map(str::to_owned)
            .ok_or_else(|| self.err(field, v, "must be a string"))
    }

    fn strings(&self, field: &str, v: &Value) -> Result<Vec<String>, ConfigError> {
        match v {
            Value::Null => Ok(Vec::new()),
            // kube-proxy's clusterCIDR is one comma-separated string.
            Value::String(s) => Ok(s
                .split(',')
                .map(|x| x.trim().to_owned())
                .filter(|x| !x.is_empty())
                .collect()),
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, x)| self.string(&format!("{field}[{i}]"), x))
                .collect(),
            _ => Err(self.err(field, v, "must be a list of strings")),
        }
    }

    fn number(&self, field: &str, v: &Value) -> Result<u32, ConfigError> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| self.err(field, v, "must be a number"))
    }

    /// A map capacity: a number, or the string `auto`.
    fn sizing(&self, field: &str, v: &Value) -> Result<Sizing, ConfigError> {
        let text = match v {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => return Err(self.err(field, v, "must be a number or \"auto\"")),
        };
        text.parse().map_err(|e: String| self.err(field, v, e))
    }

    fn boolean(&self, field: &str, v: &Value) -> Result<bool, ConfigError> {
        v.as_bool()
            .ok_or_else(|| self.err(field, v, "must be true or false"))
    }

    fn choice<T: ValueEnum>(&self, field: &str, v: &Value) -> Result<T, ConfigError> {
        let s = self.string(field, v)?;
        T::from_str(&s, true).map_err(|_| {
            let names: Vec<String> = T::value_variants()
                .iter()
                .filter_map(|x| x.to_possible_value().map(|p| p.get_name().to_owned()))
                .collect();
            self.err(field, v, format!("must be one of {}", names.join(", ")))
        })
    }

    fn map<'v>(&self, field: &str, v: &'v Value) -> Result<Vec<(String, &'v Value)>, ConfigError> {
        match v {
            Value::Null => Ok(Vec::new()),
            Value::Mapping(m) => m
                .iter()
                .map(|(k, x)| match k.as_str() {
                    Some(k) => Ok((k.to_owned(), x)),
                    None => Err(self.err(field, k, "keys must be strings")),
                })
                .collect(),
            _ => Err(self.err(field, v, "must be a mapping")),
        }
    }
}

/// Parse the file's text (`path` only names it in errors). Returns the
/// settings and warnings about fields that do not apply.
pub fn parse(path: &Path, text: &str) -> Result<(FileConfig, Vec<String>), ConfigError> {
    let doc: Value = serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut r = Reader {
        path,
        warnings: Vec::new(),
    };
    let mut c = FileConfig::default();
    let top = r.map("(document)", &doc)?;
    let mut seen_version = false;
    let mut seen_kind = false;
    for (k, v) in &top {
        let v: &Value = v;
        match k.as_str() {
            "apiVersion" => {
                if v.as_str() != Some(API_VERSION) {
                    return Err(r.err(k, v, format!("must be {API_VERSION}")));
                }
                seen_version = true;
            }
            "kind" => {
                if v.as_str() != Some(KIND) {
                    return Err(r.err(k, v, format!("must be {KIND}")));
                }
                seen_kind = true;
            }
            "mode" => {
                // kube-proxy: "" means the platform default.
                if v.as_str() != Some("") {
                    c.mode = Some(r.choice(k, v)?);
                }
            }
            "clusterCIDR" => c.cluster_cidr = Some(r.strings(k, v)?),
            "hostnameOverride" => c.hostname_override = Some(r.string(k, v)?),
            "metricsBindAddress" => c.metrics_bind_address = Some(r.string(k, v)?),
            "healthzBindAddress" => c.healthz_bind_address = Some(r.string(k, v)?),
            "nodePortAddresses" => {
                let list = r.strings(k, v)?;
                crate::model::NodePortAddresses::parse(&list)
                    .map_err(|e| r.err(k, &Value::String(list.join(",")), e.to_string()))?;
                c.nodeport_addresses = Some(list);
            }
            "syncPeriod" => {
                let s = r.string(k, v)?;
                c.sync_period = Some(parse_duration(&s).map_err(|e| r.err(k, v, e))?);
            }
            "clientConnection" => {
                for (ck, cv) in r.map(k, v)? {
                    let field = format!("clientConnection.{ck}");
                    match ck.as_str() {
                        "kubeconfig" => {
                            let s = r.string(&field, cv)?;
                            if !s.is_empty() {
                                c.kubeconfig = Some(PathBuf::from(s));
                            }
                        }
                        x if IGNORED_CLIENT.contains(&x) => {
                            r.warnings.push(format!("{field} does not apply; ignored"))
                        }
                        _ => return Err(r.err(&field, cv, "unknown field")),
                    }
                }
            }
            EXTENSION => {
                for (ek, ev) in r.map(k, v)? {
                    let field = format!("{EXTENSION}.{ek}");
                    let f = field.as_str();
                    match ek.as_str() {
                        "bpffsPath" => c.bpffs_path = Some(r.string(f, ev)?.into()),
                        "socketLB" => c.socket_lb = Some(r.boolean(f, ev)?),
                        "cgroupPath" => c.cgroup_path = Some(r.string(f, ev)?.into()),
                        "podDevices" => c.pod_devices = Some(r.strings(f, ev)?),
                        "devices" => c.devices = Some(r.strings(f, ev)?),
                        "xdpMode" => c.xdp_mode = Some(r.choice(f, ev)?),
                        "maglevTableSize" => {
                            let n = ev
                                .as_u64()
                                .and_then(|n| u32::try_from(n).ok())
                                .ok_or_else(|| r.err(f, ev, "must be a number"))?;
                            if n != 0 && !crate::maglev::is_prime(n) {
                                return Err(r.err(f, ev, "must be a prime number (or 0)"));
                            }
                            c.maglev_table_size = Some(n);
                        }
                        "maglevMaxTableSize" => {
                            let n = r.number(f, ev)?;
                            if n == 0 || n > crate::maglev::MAX_TABLE_SIZE {
                                return Err(r.err(f, ev, "must be between 1 and 1048576"));
                            }
                            c.maglev_max_table_size = Some(n);
                        }
                        "maglevMapMax" => c.maglev_map_max = Some(r.sizing(f, ev)?),
                        "bpfLbMapMax" => c.bpf_lb_map_max = Some(r.sizing(f, ev)?),
                        "bpfLbBackendMapMax" => c.bpf_lb_backend_map_max = Some(r.sizing(f, ev)?),
                        "bpfLbSlotMapMax" => c.bpf_lb_slot_map_max = Some(r.sizing(f, ev)?),
                        "bpfCtMapMax" => c.bpf_ct_map_max = Some(r.sizing(f, ev)?),
                        "bpfAffinityMapMax" => c.bpf_affinity_map_max = Some(r.sizing(f, ev)?),
                        "bpfSourceRangesMapMax" => {
                            c.bpf_source_ranges_map_max = Some(r.sizing(f, ev)?)
                        }
                        "dsr" => c.dsr = Some(r.boolean(f, ev)?),
                        "sourceRangesAll" => c.source_ranges_all = Some(r.boolean(f, ev)?),
                        "logFormat" => c.log_format = Some(r.choice(f, ev)?),
                        _ => return Err(r.err(f, ev, "unknown field")),
                    }
                }
            }
            x if IGNORED.contains(&x) => r.warnings.push(format!("{x} does not apply; ignored")),
            _ => return Err(r.err(k, v, "unknown field")),
        }
    }
    if !seen_version {
        return Err(r.err("apiVersion", &Value::Null, format!("must be {API_VERSION}")));
    }
    if !seen_kind {
        return Err(r.err("kind", &Value::Null, format!("must be {KIND}")));
    }
    Ok((c, r.warnings))
}

/// Read and parse a config file.
pub fn load(path: &Path) -> Result<(FileConfig, Vec<String>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    parse(path, &text)
}

/// Fill `args` from the file where the flag was not given explicitly
/// (`explicit(id)`: given on the command line or through its environment
/// variable).
pub fn merge(args: &mut Args, file: FileConfig, explicit: impl Fn(&str) -> bool) {
    macro_rules! take {
        ($field:ident) => {
            take!($field, |v| v)
        };
        ($field:ident, $wrap:expr) => {
            if let Some(v) = file.$field
                && !explicit(stringify!($field))
            {
                args.$field = $wrap(v);
            }
        };
    }
    take!(mode);
    take!(cluster_cidr);
    take!(hostname_override, Some);
    take!(metrics_bind_address);
    take!(healthz_bind_address);
    take!(nodeport_addresses);
    take!(kubeconfig, Some);
    take!(sync_period);
    take!(bpffs_path);
    take!(socket_lb);
    take!(cgroup_path, Some);
    take!(pod_devices);
    take!(devices);
    take!(xdp_mode);
    take!(maglev_table_size);
    take!(maglev_max_table_size);
    take!(maglev_map_max);
    take!(bpf_lb_map_max);
    take!(bpf_lb_backend_map_max);
    take!(bpf_lb_slot_map_max);
    take!(bpf_ct_map_max);
    take!(bpf_affinity_map_max);
    take!(bpf_source_ranges_map_max);
    take!(dsr);
    take!(source_ranges_all);
    take!(log_format);
}

/// Whether the argument `id` of `m` was given (command line or environment).
pub fn explicit_in(m: &ArgMatches) -> impl Fn(&str) -> bool + '_ {
    move |id| {
        matches!(
            m.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    }
}

/// The agent's effective arguments: the command line, then `--config` for
/// what the command line left unset. Returns warnings to log.
pub fn resolve(m: &ArgMatches) -> Result<(Args, Vec<String>), anyhow::Error> {
    use clap::FromArgMatches;
    let mut args = Args::from_arg_matches(m)?;
    let mut warnings = Vec::new();
    if let Some(path) = args.config.clone() {
        let (file, w) = load(&path)?;
        warnings = w;
        merge(&mut args, file, explicit_in(m));
    }
    Ok((args, warnings))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    const FULL: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ebpf
clusterCIDR: 10.244.0.0/16,10.245.0.0/16
hostnameOverride: node-a
metricsBindAddress: 0.0.0.0:10249
healthzBindAddress: 0.0.0.0:10256
nodePortAddresses: [172.18.0.0/16]
syncPeriod: 10s
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
iptables:
  masqueradeAll: false
kubeProxyEbpf:
  bpffsPath: /sys/fs/bpf/x
  socketLB: false
  xdpMode: generic
  maglevTableSize: 251
  maglevMaxTableSize: 4099
  maglevMapMax: 100000
  bpfLbMapMax: 200000
  bpfLbBackendMapMax: auto
  bpfCtMapMax: "1048576"
  dsr: true
  logFormat: json
"#;

    #[test]
    fn reads_the_fields_that_apply() {
        let (c, warnings) = parse(Path::new("c.yaml"), FULL).expect("parses");
        assert_eq!(c.mode, Some(Mode::Ebpf));
        assert_eq!(
            c.cluster_cidr,
            Some(vec!["10.244.0.0/16".into(), "10.245.0.0/16".into()])
        );
        assert_eq!(c.hostname_override.as_deref(), Some("node-a"));
        assert_eq!(c.nodeport_addresses, Some(vec!["172.18.0.0/16".into()]));
        assert_eq!(c.sync_period, Some(std::time::Duration::from_secs(10)));
        assert_eq!(
            c.kubeconfig,
            Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
        );
        assert_eq!(c.xdp_mode, Some(XdpMode::Generic));
        assert_eq!(c.maglev_table_size, Some(251));
        assert_eq!(c.maglev_max_table_size, Some(4099));
        assert_eq!(c.maglev_map_max, Some(Sizing::Fixed(100_000)));
        assert_eq!(c.bpf_lb_map_max, Some(Sizing::Fixed(200_000)));
        assert_eq!(c.bpf_lb_backend_map_max, Some(Sizing::Auto));
        assert_eq!(c.bpf_ct_map_max, Some(Sizing::Fixed(1 << 20)));
        assert_eq!(c.bpf_lb_slot_map_max, None);
        assert_eq!(c.socket_lb, Some(false));
        assert_eq!(c.log_format, Some(LogFormat::Json));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
    }

    #[test]
    fn errors_name_field_and_value() {
        let p = Path::new("c.yaml");
        let with = |extra: &str| format!("apiVersion: {API_VERSION}\nkind: {KIND}\n{extra}\n");
        let e = parse(p, &with("metricsBindAdress: 1.2.3.4:5")).expect_err("typo");
        assert_eq!(
            e.to_string(),
            "c.yaml: field metricsBindAdress = \"1.2.3.4:5\": unknown field"
        );
        let e = parse(p, &with("nodePortAddresses: [primary, 10.0.0.0/8]")).expect_err("mix");
        assert!(
            e.to_string()
                .contains("field nodePortAddresses = \"primary,10.0.0.0/8\": can't use both \"primary\" and CIDRs"),
            "{e}"
        );
        let e = parse(p, &with("nodePortAddresses: [10.0.0.0/33]")).expect_err("bad CIDR");
        assert!(
            e.to_string()
                .contains("\"10.0.0.0/33\" is neither \"primary\" nor an IPv4 or IPv6 CIDR"),
            "{e}"
        );
        let (c, _) = parse(p, &with("nodePortAddresses: [primary]")).expect("primary");
        assert_eq!(c.nodeport_addresses, Some(vec!["primary".into()]));
        let e = parse(p, &with("mode: userspace")).expect_err("bad mode");
        assert!(
            e.to_string()
                .contains("field mode = \"userspace\": must be one of ebpf"),
            "{e}"
        );
        let e = parse(p, &with("kubeProxyEbpf:\n  maglevMaxTableSize: 0")).expect_err("zero");
        assert!(
            e.to_string()
                .contains("kubeProxyEbpf.maglevMaxTableSize = 0: must be between 1 and 1048576"),
            "{e}"
        );
        let e = parse(p, &with("kubeProxyEbpf:\n  maglevTableSize: 100")).expect_err("not prime");
        assert!(
            e.to_string()
                .contains("kubeProxyEbpf.maglevTableSize = 100"),
            "{e}"
        );
        let e = parse(p, &with("kubeProxyEbpf:\n  bpfLbMapMax: 0")).expect_err("zero capacity");
        assert!(
            e.to_string()
                .contains("kubeProxyEbpf.bpfLbMapMax = 0: \"0\": a map needs at least one entry"),
            "{e}"
        );
        let e = parse(p, &with("kubeProxyEbpf:\n  bpfCtMapMax: [1]")).expect_err("list");
        assert!(
            e.to_string()
                .contains("kubeProxyEbpf.bpfCtMapMax = - 1: must be a number or \"auto\""),
            "{e}"
        );
        let e = parse(p, &with("kubeProxyEbpf:\n  xdp: native")).expect_err("unknown ext");
        assert!(
            e.to_string()
                .contains("kubeProxyEbpf.xdp = \"native\": unknown field"),
            "{e}"
        );
        let e = parse(p, &with("syncPeriod: soon")).expect_err("bad duration");
        assert!(e.to_string().contains("syncPeriod = \"soon\""), "{e}");
        let e = parse(p, "kind: KubeProxyConfiguration\n").expect_err("no apiVersion");
        assert!(e.to_string().contains("apiVersion"), "{e}");
        let e = parse(
            p,
            "apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n",
        )
        .expect_err("version");
        assert!(e.to_string().contains("v1alpha2"), "{e}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let (file, _) = parse(Path::new("c.yaml"), FULL).expect("parses");
        let argv = [
            "proxy",
            "--metrics-bind-address",
            "127.0.0.1:9999",
            "--xdp-mode",
            "native",
        ];
        let m = Args::command().get_matches_from(argv);
        let mut args = Args::try_parse_from(argv).expect("args");
        merge(&mut args, file, explicit_in(&m));
        assert_eq!(args.metrics_bind_address, "127.0.0.1:9999");
        assert_eq!(args.xdp_mode, XdpMode::Native);
        assert_eq!(args.healthz_bind_address, "0.0.0.0:10256");
        assert_eq!(args.hostname_override.as_deref(), Some("node-a"));
        assert_eq!(args.maglev_table_size, 251);
        assert_eq!(args.bpf_lb_map_max, Sizing::Fixed(200_000));
        assert_eq!(args.bpf_lb_slot_map_max, Sizing::Auto);
        assert!(args.dsr);
        assert!(!args.socket_lb);
    }
}
