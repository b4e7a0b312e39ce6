//! The worker's Ed25519 identity: created on first run, kept in a file only
//! its owner can read (as ssh does, a key others can read is refused).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::SigningKey;
use troop_schemas::{PublicKey, WorkerId};

const HEADER: &str = "troop-worker-key-v1 ";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`", path = .path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} is not a troop worker key", path = .0.display())]
    Format(PathBuf),
    #[error("{path} already exists; refusing to overwrite a worker identity", path = .0.display())]
    Exists(PathBuf),
}

#[derive(Debug)]
pub struct Identity {
    pub key: SigningKey,
    pub path: PathBuf,
}

impl Identity {
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    pub fn worker_id(&self) -> WorkerId {
        WorkerId::from_key(&self.public_key())
    }

    /// A fresh key kept only in memory (simulated workers in load tests).
    pub fn ephemeral() -> Self {
        let mut seed = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        Self {
            key: SigningKey::from_bytes(&seed),
            path: PathBuf::new(),
        }
    }
}

/// Where the key lives unless told otherwise.
pub fn default_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("troop").join("worker.key")
}

fn io(path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates a new key at `path` (mode 0600, never overwriting).
pub fn create(path: &Path) -> Result<Identity, IdentityError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let mut seed = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
    let key = SigningKey::from_bytes(&seed);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::Exists(path.to_path_buf())
            } else {
                io(path, e)
            }
        })?;
    writeln!(f, "{HEADER}{}", B64.encode(seed))
        .and_then(|()| f.sync_all())
        .map_err(|e| io(path, e))?;
    Ok(Identity {
        key,
        path: path.to_path_buf(),
    })
}

/// Loads the key at `path`, refusing one that others can read.
pub fn load(path: &Path) -> Result<Identity, IdentityError> {
    let meta = std::fs::metadata(path).map_err(|e| io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    let seed: [u8; 32] = text
        .trim()
        .strip_prefix(HEADER)
        .and_then(|b| B64.decode(b).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| IdentityError::Format(path.to_path_buf()))?;
    Ok(Identity {
        key: SigningKey::from_bytes(&seed),
        path: path.to_path_buf(),
    })
}

/// Loads the key, creating it on first run.
pub fn load_or_create(path: &Path) -> Result<(Identity, bool), IdentityError> {
    match load(path) {
        Ok(id) => Ok((id, false)),
        Err(IdentityError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok((create(path)?, true))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/worker.key");
        let (a, created) = load_or_create(&path).expect("create");
        assert!(created);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = load_or_create(&path).expect("load");
        assert!(!created);
        assert_eq!(a.worker_id(), b.worker_id());
        assert!(matches!(create(&path), Err(IdentityError::Exists(_))));
    }

    #[test]
    fn refuses_keys_others_can_read_and_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("worker.key");
        create(&path).expect("create");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            load(&path),
            Err(IdentityError::Permissions { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&path, "not a key").expect("write");
        assert!(matches!(load(&path), Err(IdentityError::Format(_))));
    }
}
