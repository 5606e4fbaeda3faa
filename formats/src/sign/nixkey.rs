//! Ed25519 keys in Nix's own format (`NAME:BASE64`, as
//! `nix-store --generate-binary-cache-key NAME SECRET PUBLIC` writes them:
//! the secret 64 bytes, seed then public key; the public 32), and
//! signatures as Nix writes them (`NAME:BASE64` of the 64-byte
//! signature): what signs an image's layout manifest (`IMAGE.sig`).

use base64::Engine;
use ed25519_dalek::{Signer as _, Verifier as _};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `NAME:BASE64` split and decoded to exactly `n` bytes.
fn parse(text: &str, n: usize, what: &str) -> Result<(String, Vec<u8>), String> {
    let want = format!("a Nix {what} key, NAME:BASE64 of {n} bytes, as nix-store --generate-binary-cache-key writes it");
    let Some((name, b64)) = text.trim().split_once(':') else {
        return Err(format!("not {want}"));
    };
    match B64.decode(b64) {
        Ok(bytes) if bytes.len() == n && !name.is_empty() => Ok((name.to_string(), bytes)),
        _ => Err(format!("not {want}")),
    }
}

/// A secret key: its name and the Ed25519 key.
pub struct SecretKey {
    pub name: String,
    key: ed25519_dalek::SigningKey,
}

impl SecretKey {
    pub fn parse(text: &str) -> Result<SecretKey, String> {
        let (name, bytes) = parse(text, 64, "secret")?;
        let seed: [u8; 32] = bytes[..32].try_into().expect("32 bytes");
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        if key.verifying_key().as_bytes() != &bytes[32..] {
            return Err("a Nix secret key whose public half does not match its seed".into());
        }
        Ok(SecretKey { name, key })
    }

    /// `NAME:BASE64` of the Ed25519 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        let sig = self.key.sign(message);
        format!("{}:{}", self.name, B64.encode(sig.to_bytes()))
    }

    /// The Ed25519 key (OpenPGP signs with it too).
    pub(crate) fn ed25519(&self) -> &ed25519_dalek::SigningKey {
        &self.key
    }

    /// The public key, as Nix writes it.
    pub fn public(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            B64.encode(self.key.verifying_key().as_bytes())
        )
    }
}

/// A public (trusted) key: a Nix one, or an OpenSSH `ssh-ed25519` one.
#[derive(Clone, Debug)]
pub struct PublicKey {
    /// The Nix key's name (a signature must give it); for an OpenSSH key,
    /// its comment, and any name a signature gives is taken.
    pub name: String,
    /// An OpenSSH key (it has no name of its own).
    pub openssh: bool,
    key: ed25519_dalek::VerifyingKey,
}

/// The key an OpenSSH `ssh-ed25519 BASE64 [COMMENT]` line holds: the
/// blob is the string "ssh-ed25519" then the 32-byte key, each after its
/// 4-byte big-endian length.
fn openssh(text: &str) -> Option<(String, [u8; 32])> {
    let mut words = text.split_whitespace();
    let (kind, b64) = (words.next()?, words.next()?);
    let comment = words.collect::<Vec<_>>().join(" ");
    let blob = B64.decode(b64).ok()?;
    let field = |at: usize| -> Option<(&[u8], usize)> {
        let n = u32::from_be_bytes(blob.get(at..at + 4)?.try_into().ok()?) as usize;
        Some((blob.get(at + 4..at + 4 + n)?, at + 4 + n))
    };
    let (name, at) = field(0)?;
    let (key, end) = field(at)?;
    if kind != "ssh-ed25519" || name != b"ssh-ed25519" || end != blob.len() {
        return None;
    }
    Some((comment, key.try_into().ok()?))
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, String> {
        let (name, bytes) = parse(text, 32, "public")?;
        let raw: [u8; 32] = bytes.try_into().expect("32 bytes");
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| "a Nix public key that is not an Ed25519 point".to_string())?;
        Ok(PublicKey {
            name,
            openssh: false,
            key,
        })
    }

    /// A Nix public key, or an OpenSSH Ed25519 one (`ssh-ed25519 AAAA…`,
    /// as in `~/.ssh/id_ed25519.pub`).
    pub fn parse_anchor(text: &str) -> Result<PublicKey, String> {
        if !text.trim_start().starts_with("ssh-") {
            return PublicKey::parse(text)
                .map_err(|e| format!("{e}, or an OpenSSH ssh-ed25519 public key"));
        }
        let Some((comment, raw)) = openssh(text.trim()) else {
            return Err("not an OpenSSH Ed25519 public key (ssh-ed25519 AAAA… as ssh-keygen -t ed25519 writes it), nor a Nix public key (NAME:BASE64)".into());
        };
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| "an OpenSSH key that is not an Ed25519 point".to_string())?;
        Ok(PublicKey {
            name: comment,
            openssh: true,
            key,
        })
    }

    /// Whether `signature` (`NAME:BASE64`) is this key's over `message`.
    pub fn verifies(&self, message: &[u8], signature: &str) -> bool {
        let Some((name, b64)) = signature.trim().split_once(':') else {
            return false;
        };
        let Ok(bytes) = B64.decode(b64) else {
            return false;
        };
        let Ok(sig) = ed25519_dalek::Signature::from_slice(&bytes) else {
            return false;
        };
        (self.openssh || name == self.name) && self.key.verify(message, &sig).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by `nix-store --generate-binary-cache-key test.example-1 SK PK`
    /// for these tests (not secret).
    const SK: &str = include_str!("testdata/nix-test-key.sec");
    const PK: &str = include_str!("testdata/nix-test-key.pub");

    #[test]
    fn nix_keys_sign_and_verify_and_other_bytes_do_not() {
        let sk = SecretKey::parse(SK).unwrap();
        assert_eq!(sk.public(), PK);
        let pk = PublicKey::parse(PK).unwrap();
        let sig = sk.sign(b"manifest");
        assert!(sig.starts_with("test.example-1:"));
        assert!(pk.verifies(b"manifest", &sig));
        assert!(!pk.verifies(b"manifesT", &sig));
        assert!(!pk.verifies(b"manifest", &sig.replace("test.example-1", "other")));
        assert_eq!(sk.sign(b"manifest"), sig, "Ed25519 is deterministic");
    }

    #[test]
    fn wrong_formats_say_which_is_wanted() {
        let e = SecretKey::parse(PK).err().unwrap();
        assert!(
            e.contains("not a Nix secret key, NAME:BASE64 of 64 bytes"),
            "{e}"
        );
        let e = PublicKey::parse("ssh-ed25519 AAAA").err().unwrap();
        assert!(e.contains("not a Nix public key"), "{e}");
        assert!(PublicKey::parse(SK).is_err());
        let e = PublicKey::parse_anchor("ssh-rsa AAAAB3NzaC1yc2E= me")
            .err()
            .unwrap();
        assert!(e.contains("not an OpenSSH Ed25519 public key"), "{e}");
    }

    #[test]
    fn an_openssh_ed25519_key_is_an_anchor_for_any_name() {
        let sk = SecretKey::parse(SK).unwrap();
        let raw = &B64.decode(PK.split_once(':').unwrap().1).unwrap();
        let mut blob = Vec::new();
        for field in [b"ssh-ed25519".as_slice(), raw] {
            blob.extend((field.len() as u32).to_be_bytes());
            blob.extend(field);
        }
        let line = format!("ssh-ed25519 {} ci@example\n", B64.encode(&blob));
        let pk = PublicKey::parse_anchor(&line).unwrap();
        assert!(pk.openssh);
        assert_eq!(pk.name, "ci@example");
        assert!(pk.verifies(b"manifest", &sk.sign(b"manifest")));
        assert!(!pk.verifies(b"manifesT", &sk.sign(b"manifest")));
        assert!(PublicKey::parse_anchor(PK).is_ok(), "Nix keys too");
    }
}
