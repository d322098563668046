//! Key files: this node's private key, the cluster's pre-shared key, and
//! the public keys of `[public_keys]`.
//!
//! Formats (text, one line):
//!
//! ```text
//! baton-node-key 3f0c...(64 hex digits)      private key file (0600)
//! baton-cluster-key 9ab1...(64 hex digits)   cluster key file (0600)
//! ```
//!
//! A public key (in the node configuration) is 64 hex digits. Secrets are
//! never printed: errors name the file and the problem, never its content.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Label of a private key file.
pub const NODE_KEY_LABEL: &str = "baton-node-key";
/// Label of a cluster key file.
pub const CLUSTER_KEY_LABEL: &str = "baton-cluster-key";

/// A key file that cannot be used: which file, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct KeyFileError {
    pub file: String,
    pub problem: String,
}

/// 32 secret bytes. Debug and errors never show them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(crate) [u8; 32]);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 32 bytes from the operating system's random source.
    pub fn random() -> Result<Secret, String> {
        let mut b = [0u8; 32];
        getrandom_fill(&mut b)?;
        Ok(Secret(b))
    }
}

/// A node's public key (X25519), as listed in `[public_keys]`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self)
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl std::str::FromStr for PublicKey {
    type Err = String;
    fn from_str(s: &str) -> Result<PublicKey, String> {
        from_hex32(s.trim())
            .map(PublicKey)
            .ok_or_else(|| "expected a public key of 64 hex digits (from `baton key node`)".into())
    }
}

fn getrandom_fill(b: &mut [u8]) -> Result<(), String> {
    getrandom::fill(b).map_err(|e| format!("random source: {e}"))
}

pub(crate) fn to_hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

fn from_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nib(s[2 * i])? << 4) | nib(s[2 * i + 1])?;
    }
    Some(out)
}

/// Reads a secret key file: it must exist, be a regular file readable by
/// its owner only, and hold `LABEL HEX` on one line.
pub fn load_secret(path: &Path, label: &str) -> Result<Secret, KeyFileError> {
    let err = |problem: String| KeyFileError {
        file: path.display().to_string(),
        problem,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(err("missing (create it with `baton key`)".into()))
        }
        Err(e) => return Err(err(format!("cannot read: {e}"))),
    };
    if !meta.is_file() {
        return Err(err("cannot read: not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "readable by group or others (mode {mode:03o}); it must be 600: chmod 600 {}",
            path.display()
        )));
    }
    let text = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let wrong = || {
        err(format!(
            "wrong format: expected one line `{label} <64 hex digits>` (as `baton key` writes)"
        ))
    };
    let text = std::str::from_utf8(&text).map_err(|_| wrong())?;
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(l), Some(hex), None) if l == label => from_hex32(hex).map(Secret).ok_or_else(wrong),
        (Some(l), Some(_), None) if l == NODE_KEY_LABEL || l == CLUSTER_KEY_LABEL => Err(err(
            format!("wrong kind of key: this is a {l} file, expected a {label} file"),
        )),
        _ => Err(wrong()),
    }
}

/// Writes a new secret key file with mode 0600; refuses to replace one.
pub fn write_secret(path: &Path, label: &str, secret: &Secret) -> Result<(), KeyFileError> {
    let err = |problem: String| KeyFileError {
        file: path.display().to_string(),
        problem,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                err("already exists: not replaced (remove it first)".into())
            } else {
                err(format!("cannot create: {e}"))
            }
        })?;
    // The mode above is masked by the umask; make sure it is exactly 0600.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(format!("cannot set mode 600: {e}")))?;
    f.write_all(format!("{label} {}\n", to_hex(&secret.0)).as_bytes())
        .map_err(|e| err(format!("cannot write: {e}")))?;
    f.sync_all()
        .map_err(|e| err(format!("cannot write: {e}")))?;
    Ok(())
}

/// The public key of a node's private key (X25519 base-point
/// multiplication, with the clamping X25519 applies).
pub fn public_of(private: &Secret) -> PublicKey {
    PublicKey(curve25519_dalek::MontgomeryPoint::mul_base_clamped(private.0).to_bytes())
}

/// A new node key pair: (private, public).
pub fn generate_node_key() -> Result<(Secret, PublicKey), String> {
    let kp = snow::Builder::new(super::noise::params())
        .generate_keypair()
        .map_err(|e| format!("generating a key: {e}"))?;
    let mut private = [0u8; 32];
    private.copy_from_slice(&kp.private);
    let mut public = [0u8; 32];
    public.copy_from_slice(&kp.public);
    Ok((Secret(private), PublicKey(public)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "baton-keys-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn written_keys_load_back_and_derive_their_public_key() {
        let d = dir();
        let (private, public) = generate_node_key().unwrap();
        let p = d.join("n.key");
        write_secret(&p, NODE_KEY_LABEL, &private).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = load_secret(&p, NODE_KEY_LABEL).unwrap();
        assert_eq!(back, private);
        assert_eq!(public_of(&back), public);
        assert!(write_secret(&p, NODE_KEY_LABEL, &private).is_err());
        let shown = format!("{back:?}");
        assert!(!shown.contains(&to_hex(&private.0)[..8]));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_key_files_are_one_line_errors_without_the_secret() {
        let d = dir();
        let secret = Secret::random().unwrap();
        let hex = to_hex(&secret.0);
        type Make = Box<dyn Fn(&Path)>;
        let cases: Vec<(&str, Make, &str)> = vec![
            ("missing", Box::new(|_| {}), "missing"),
            (
                "dir",
                Box::new(|p| std::fs::create_dir(p).unwrap()),
                "cannot read",
            ),
            (
                "open",
                Box::new({
                    let hex = hex.clone();
                    move |p| {
                        std::fs::write(p, format!("{NODE_KEY_LABEL} {hex}\n")).unwrap();
                        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644))
                            .unwrap();
                    }
                }),
                "readable by group or others",
            ),
            (
                "garbage",
                Box::new(|p| {
                    std::fs::write(p, b"\xff\x00garbage").unwrap();
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
                }),
                "wrong format",
            ),
            (
                "short",
                Box::new({
                    let hex = hex.clone();
                    move |p| {
                        std::fs::write(p, format!("{NODE_KEY_LABEL} {}\n", &hex[..60])).unwrap();
                        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                            .unwrap();
                    }
                }),
                "wrong format",
            ),
            (
                "kind",
                Box::new({
                    let hex = hex.clone();
                    move |p| {
                        std::fs::write(p, format!("{CLUSTER_KEY_LABEL} {hex}\n")).unwrap();
                        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
                            .unwrap();
                    }
                }),
                "wrong kind of key",
            ),
        ];
        for (name, make, expect) in cases {
            let p = d.join(name);
            make(&p);
            let e = load_secret(&p, NODE_KEY_LABEL).unwrap_err().to_string();
            assert!(e.contains(expect), "{name}: {e}");
            assert!(e.contains(name), "{name}: names the file: {e}");
            assert!(!e.contains('\n'), "{name}: one line: {e}");
            assert!(!e.contains(&hex[..16]), "{name}: no secret: {e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn public_keys_parse_from_hex() {
        let (_, public) = generate_node_key().unwrap();
        let s = public.to_string();
        assert_eq!(s.parse::<PublicKey>().unwrap(), public);
        assert!("abc".parse::<PublicKey>().is_err());
        assert!(s.replace(&s[..1], "z").parse::<PublicKey>().is_err());
    }
}
