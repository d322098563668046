//! The `baton` command.

mod bench;
mod demo;
mod key;
mod lab;
mod node;
mod services;
mod standalone;

use clap::{Parser, Subcommand};

/// baton keeps TCP services and their clients' live connections running
/// across node failure, maintenance and rebalancing.
#[derive(Parser)]
#[command(name = "baton", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Virtual clusters in network namespaces (needs root).
    Lab(lab::LabArgs),
    /// Builds a lab, shows its hosts reaching each other, removes it.
    Demo(demo::DemoArgs),
    /// Benchmarks in the lab (needs root); JSON with --json.
    Bench(bench::BenchArgs),
    /// Runs a node: its services, the control API, moves (needs root).
    Node(node::NodeArgs),
    /// Talks to the local node: status, move.
    Ctl(node::CtlArgs),
    /// Writes key files for node configurations: node keys, cluster key.
    Key(key::KeyArgs),
    /// Runs a built-in service as a plain TCP server, without the baton
    /// runtime (the benchmarks' baseline).
    #[command(hide = true)]
    ServeStandalone(standalone::StandaloneArgs),
    /// The connection keeper a node starts for itself: it holds the node's
    /// client sockets and, if the node dies, closes them without a word and
    /// drops its VIPs (see `baton_net::keeper`).
    #[command(hide = true)]
    Keeper,
}

/// The hidden `keeper` subcommand: blocks until the node is gone.
fn run_keeper() -> anyhow::Result<i32> {
    match baton_net::keeper::run_keeper()? {
        baton_net::keeper::KeeperExit::Fenced(f) => {
            tracing::warn!(
                ?f,
                "the node is gone: its connections were closed silently and its VIPs dropped"
            )
        }
        released => tracing::debug!(?released, "keeper done"),
    }
    Ok(0)
}

fn main() {
    tracing_subscriber::fmt()
        // Newer kernels send netlink attributes the parser does not know
        // yet; it says so on every message.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
                .add_directive(
                    "netlink_packet_route=error"
                        .parse()
                        .expect("static directive"),
                ),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Lab(args) => lab::run(args),
        Commands::Demo(args) => demo::run(args),
        Commands::Bench(args) => bench::run(args),
        Commands::Node(args) => node::run_node(args),
        Commands::Ctl(args) => node::run_ctl(args),
        Commands::Key(args) => key::run(args),
        Commands::ServeStandalone(args) => standalone::run(args),
        Commands::Keeper => run_keeper(),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("baton: {e:#}");
            std::process::exit(1);
        }
    }
}
