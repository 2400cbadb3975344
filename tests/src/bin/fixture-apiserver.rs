//! Standalone Kubernetes API server fixture.
//!
//! `fixture-apiserver --listen 127.0.0.1:8080 --load a.yaml --load b.yaml --kubeconfig OUT`
//! serves Services, EndpointSlices and Nodes until killed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use proxy_tests::apiserver::ApiServer;

#[derive(Parser, Debug)]
#[command(about = "In-process Kubernetes API server fixture (Services, EndpointSlices, Nodes)")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// YAML files to apply at startup (multi-document).
    #[arg(long, num_args = 1..)]
    load: Vec<PathBuf>,
    /// Write a kubeconfig pointing at the server here.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Watch bookmark interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    bookmark_interval_ms: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let server = ApiServer::start()?;
    server.set_bookmark_interval(Duration::from_millis(args.bookmark_interval_ms));
    for file in &args.load {
        let yaml =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let objs = server
            .apply_yaml(&yaml)
            .with_context(|| format!("loading {}", file.display()))?;
        tracing::info!(file = %file.display(), objects = objs.len(), "loaded");
    }
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = server.serve(listener)?;
    if let Some(path) = &args.kubeconfig {
        ApiServer::write_kubeconfig(addr, path)?;
    }
    tracing::info!(%addr, "fixture API server listening");
    println!("listening on http://{addr}");
    loop {
        std::thread::park();
    }
}
