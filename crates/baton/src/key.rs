//! `baton key`: writes the key files a node's configuration names.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use baton_node::peer::keys;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Writes a new node private key to FILE (mode 600; never replaces a
    /// file) and prints its public key, for `[public_keys]` of every node.
    Node { file: PathBuf },
    /// Writes a new cluster key to FILE (mode 600; never replaces a file):
    /// the same file goes to every node of the cluster.
    Cluster { file: PathBuf },
    /// Prints the public key of the node private key in FILE.
    Public { file: PathBuf },
}

pub fn run(args: KeyArgs) -> Result<i32> {
    match args.command {
        KeyCommand::Node { file } => {
            let (private, public) = keys::generate_node_key().map_err(|e| anyhow!(e))?;
            keys::write_secret(&file, keys::NODE_KEY_LABEL, &private)?;
            println!("{public}");
        }
        KeyCommand::Cluster { file } => {
            let secret = keys::Secret::random().map_err(|e| anyhow!(e))?;
            keys::write_secret(&file, keys::CLUSTER_KEY_LABEL, &secret)?;
        }
        KeyCommand::Public { file } => {
            let private = keys::load_secret(&file, keys::NODE_KEY_LABEL)?;
            println!("{}", keys::public_of(&private));
        }
    }
    Ok(0)
}
