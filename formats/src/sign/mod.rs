//! Signing keys and the signatures made with them: Authenticode for PE
//! files under Secure Boot (`authenticode`), and the detached PKCS#7 of a
//! dm-verity root hash (`pkcs7`). The cryptography is RustCrypto's: `rsa`
//! (RSASSA-PKCS1-v1_5 with SHA-256, the one scheme UEFI and the kernel's
//! verity signatures both take), `x509-cert` and `cms` (the DER structures);
//! what no crate has (Authenticode's SpcIndirectDataContent) is built in
//! `pkcs7`. A PKCS#1 v1.5 signature is a function of the key and the
//! message, so same key and bytes, same signature.

pub mod authenticode;
pub mod image_sig;
pub mod nixkey;
pub mod openpgp;
pub mod pkcs7;

use der::{Decode, DecodePem, Encode};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
use rsa::RsaPrivateKey;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use x509_cert::ext::pkix::{KeyUsage, KeyUsages};
use x509_cert::Certificate;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Key(PathBuf, String),
    #[error("{0}: {1}")]
    Cert(PathBuf, String),
    #[error("{key} does not match the certificate {cert} (their public keys differ)")]
    Mismatch { key: PathBuf, cert: PathBuf },
    #[error("signing: {0}")]
    Sign(String),
}

/// An RSA key and the certificate that names its public half.
pub struct Signer {
    key: RsaPrivateKey,
    cert: Certificate,
    cert_der: Vec<u8>,
}

/// The PEM block's label: what kind of key a file holds.
fn pem_label(text: &str) -> Option<&str> {
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let end = text[start..].find("-----")?;
    Some(&text[start..start + end])
}

fn load_key(path: &Path) -> Result<RsaPrivateKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read(path.into(), e))?;
    let bad = |what: String| KeyError::Key(path.into(), what);
    match pem_label(&text) {
        Some("PRIVATE KEY") => {
            RsaPrivateKey::from_pkcs8_pem(&text).map_err(|e| bad(format!("not an RSA private key ({e})")))
        }
        Some("RSA PRIVATE KEY") => RsaPrivateKey::from_pkcs1_pem(&text)
            .map_err(|e| bad(format!("not a PKCS#1 RSA private key ({e})"))),
        Some("ENCRYPTED PRIVATE KEY") => Err(bad(
            "the key is encrypted; give it decrypted (openssl pkey -in KEY -out PLAIN), outside the Nix store".into(),
        )),
        Some(other) => Err(bad(format!("a {other:?} PEM block, not an RSA private key (only RSA keys sign here)"))),
        None => Err(bad("no PEM private key in it".into())),
    }
}

fn load_cert(path: &Path) -> Result<(Certificate, Vec<u8>), KeyError> {
    let bytes = std::fs::read(path).map_err(|e| KeyError::Read(path.into(), e))?;
    let bad = |what: String| KeyError::Cert(path.into(), what);
    let cert = match std::str::from_utf8(&bytes) {
        Ok(text) if text.contains("-----BEGIN") => Certificate::from_pem(text),
        _ => Certificate::from_der(&bytes),
    }
    .map_err(|e| bad(format!("not an X.509 certificate ({e})")))?;
    let der = cert.to_der().map_err(|e| bad(e.to_string()))?;
    Ok((cert, der))
}

/// Whether the certificate lets its key sign: an RSA key, and a key usage
/// (when it says one) that includes digital signatures.
fn check_cert_signs(cert: &Certificate, path: &Path) -> Result<(), KeyError> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    if spki.algorithm.oid != const_oid::db::rfc5912::RSA_ENCRYPTION {
        return Err(KeyError::Cert(
            path.into(),
            format!(
                "its public key is {} , not RSA; only RSA keys sign here",
                spki.algorithm.oid
            ),
        ));
    }
    let exts = cert.tbs_certificate.extensions.iter().flatten();
    for e in exts.filter(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_KEY_USAGE) {
        let usage = KeyUsage::from_der(e.extn_value.as_bytes()).map_err(|err| {
            KeyError::Cert(path.into(), format!("its key usage is unreadable ({err})"))
        })?;
        if !usage.0.contains(KeyUsages::DigitalSignature) {
            return Err(KeyError::Cert(
                path.into(),
                "its key usage does not allow digital signatures".into(),
            ));
        }
    }
    Ok(())
}

impl Signer {
    /// The key and certificate (PEM; the certificate may also be DER), once
    /// checked to belong together and to be able to sign.
    pub fn load(key: &Path, cert: &Path) -> Result<Signer, KeyError> {
        let (certificate, cert_der) = load_cert(cert)?;
        check_cert_signs(&certificate, cert)?;
        let private = load_key(key)?;
        let public = private
            .to_public_key()
            .to_public_key_der()
            .map_err(|e| KeyError::Key(key.into(), e.to_string()))?;
        let named = certificate
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| KeyError::Cert(cert.into(), e.to_string()))?;
        if public.as_bytes() != named.as_slice() {
            return Err(KeyError::Mismatch {
                key: key.into(),
                cert: cert.into(),
            });
        }
        Ok(Signer {
            key: private,
            cert: certificate,
            cert_der,
        })
    }

    /// RSASSA-PKCS1-v1_5 over SHA-256 of `message` (blinded with the OS's
    /// randomness; the signature itself does not depend on it).
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        use rsa::signature::{RandomizedSigner, SignatureEncoding};
        let key = rsa::pkcs1v15::SigningKey::<Sha256>::new(self.key.clone());
        let sig = key
            .try_sign_with_rng(&mut rsa::rand_core::OsRng, message)
            .map_err(|e| KeyError::Sign(e.to_string()))?;
        Ok(sig.to_vec())
    }

    pub fn certificate(&self) -> &Certificate {
        &self.cert
    }

    /// The certificate's DER bytes.
    pub fn certificate_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// SHA-256 of the certificate's DER: the `certificateFingerprint` of a
    /// verity signature.
    pub fn fingerprint(&self) -> [u8; 32] {
        Sha256::digest(&self.cert_der).into()
    }
}

/// A root-verity-sig partition's bytes, as the Discoverable Partitions
/// spec and systemd-repart have them: a JSON object with the root hash (hex),
/// the signing certificate's SHA-256 fingerprint (hex) and a detached
/// PKCS#7 signature of the hex root hash (base64), NUL-padded to a multiple
/// of 4096 bytes.
pub fn verity_signature(signer: &Signer, root_hash_hex: &str) -> Result<Vec<u8>, KeyError> {
    use base64::Engine;
    let sig = pkcs7::detached(signer, root_hash_hex.as_bytes())?;
    let hex: String = signer
        .fingerprint()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let json = serde_json::json!({
        "rootHash": root_hash_hex,
        "certificateFingerprint": hex,
        "signature": base64::engine::general_purpose::STANDARD.encode(sig),
    });
    let mut bytes = serde_json::to_vec(&json).map_err(|e| KeyError::Sign(e.to_string()))?;
    bytes.resize(bytes.len().next_multiple_of(4096), 0);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key pair made for these tests (not secret; in `testdata/`).
    pub(crate) fn test_signer() -> Signer {
        Signer::load(&data("test.key"), &data("test.crt")).unwrap()
    }

    pub(crate) fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/sign/testdata")
            .join(name)
    }

    #[test]
    fn a_signature_is_the_same_each_time_and_verifies() {
        use rsa::signature::Verifier;
        let s = test_signer();
        let (a, b) = (s.sign(b"root hash").unwrap(), s.sign(b"root hash").unwrap());
        assert_eq!(a, b);
        let public = rsa::pkcs1v15::VerifyingKey::<Sha256>::new(s.key.to_public_key());
        let sig = rsa::pkcs1v15::Signature::try_from(a.as_slice()).unwrap();
        public.verify(b"root hash", &sig).unwrap();
        assert!(public.verify(b"root hasH", &sig).is_err());
    }

    #[test]
    fn keys_that_cannot_sign_are_refused_naming_the_file() {
        let err = |k: &str, c: &str| Signer::load(&data(k), &data(c)).err().unwrap().to_string();
        let e = err("other.key", "test.crt");
        assert!(
            e.contains("other.key does not match the certificate"),
            "{e}"
        );
        assert!(e.contains("test.crt"), "{e}");
        let e = err("other.key", "other.crt");
        assert!(
            e.contains("other.crt: its key usage does not allow digital signatures"),
            "{e}"
        );
        let e = err("ec.key", "test.crt");
        assert!(e.contains("ec.key: a \"EC PRIVATE KEY\" PEM block"), "{e}");
        let e = err("missing.key", "test.crt");
        assert!(e.contains("missing.key: No such file"), "{e}");
        let e = err("test.key", "test.key");
        assert!(e.contains("test.key: not an X.509 certificate"), "{e}");
    }

    #[test]
    fn an_encrypted_key_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("enc.key");
        std::fs::write(
            &p,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = Signer::load(&p, &data("test.crt"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("enc.key: the key is encrypted"), "{e}");
    }
}
