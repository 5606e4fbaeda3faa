//! `IMAGE.sig`: an image's layout manifest signed with a Nix Ed25519 key
//! (one line, `NAME:BASE64` of the signature over the manifest's exact
//! bytes), and the trust anchors it is checked with: Nix public keys and
//! OpenSSH `ssh-ed25519` ones, given one per file or as a directory of
//! them. What a good signature vouches for beyond the manifest (the
//! image, its bmap) is for the reader to check: `flash::trust`.

use std::path::{Path, PathBuf};

use super::nixkey::PublicKey;

/// What an image's signature's name adds to the image's.
pub const SUFFIX: &str = ".sig";

/// `IMAGE.sig` beside `image`.
pub fn path_for(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(SUFFIX);
    PathBuf::from(s)
}

/// A trusted public key and the file it came from.
#[derive(Clone, Debug)]
pub struct Anchor {
    pub key: PublicKey,
    pub file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SigError {
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Key(PathBuf, String),
    #[error(
        "{0}: not a signature (one line NAME:BASE64 of 64 bytes, as forge sign --key writes it)"
    )]
    NotASignature(PathBuf),
    #[error("{sig}: signed by {name:?}, which is not a trusted key (trusted: {trusted})")]
    Untrusted {
        sig: PathBuf,
        name: String,
        trusted: String,
    },
    #[error("{sig}: not a signature of {manifest} by the trusted key {name:?} (the manifest was changed after signing, the signature is another image's, or another key of that name made it)")]
    Mismatch {
        sig: PathBuf,
        manifest: PathBuf,
        name: String,
    },
}

/// The key in `path`: a Nix public key or an OpenSSH Ed25519 one.
pub fn load_anchor(path: &Path) -> Result<Anchor, SigError> {
    let text = std::fs::read_to_string(path).map_err(|e| SigError::Read(path.into(), e))?;
    let key = PublicKey::parse_anchor(&text).map_err(|e| SigError::Key(path.into(), e))?;
    Ok(Anchor {
        key,
        file: path.into(),
    })
}

/// Every key file in `dir` (not those whose names start with a dot), in
/// name order; one that is not a key is an error naming it.
pub fn anchors_in(dir: &Path) -> Result<Vec<Anchor>, SigError> {
    let read = |e| SigError::Read(dir.into(), e);
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(read)? {
        let e = e.map_err(read)?;
        let hidden = e.file_name().to_string_lossy().starts_with('.');
        if !hidden && e.path().is_file() {
            files.push(e.path());
        }
    }
    files.sort();
    files.iter().map(|f| load_anchor(f)).collect()
}

/// The anchor whose key made `text` (the content of `sig`) over
/// `manifest` (the bytes of the file `manifest_path`).
pub fn verify<'a>(
    sig: &Path,
    text: &str,
    manifest_path: &Path,
    manifest: &[u8],
    anchors: &'a [Anchor],
) -> Result<&'a Anchor, SigError> {
    let name = signer(text).ok_or_else(|| SigError::NotASignature(sig.into()))?;
    if let Some(a) = anchors.iter().find(|a| a.key.verifies(manifest, text)) {
        return Ok(a);
    }
    let ours = anchors.iter().any(|a| a.key.name == name && !a.key.openssh);
    if ours {
        return Err(SigError::Mismatch {
            sig: sig.into(),
            manifest: manifest_path.into(),
            name,
        });
    }
    let trusted: Vec<String> = anchors
        .iter()
        .map(|a| format!("{:?} ({})", a.key.name, a.file.display()))
        .collect();
    Err(SigError::Untrusted {
        sig: sig.into(),
        name,
        trusted: trusted.join(", "),
    })
}

/// The key name a signature line gives, if it is one (`NAME:BASE64` of
/// 64 bytes, one line).
pub fn signer(text: &str) -> Option<String> {
    use base64::Engine;
    let line = text.strip_suffix('\n').unwrap_or(text);
    let (name, b64) = line.split_once(':')?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    (bytes.len() == 64 && !name.is_empty() && !line.contains('\n')).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::nixkey::SecretKey;
    use super::*;

    const SK: &str = include_str!("testdata/nix-test-key.sec");
    const PK: &str = include_str!("testdata/nix-test-key.pub");

    #[test]
    fn a_signature_is_checked_against_the_anchors_and_says_why_not() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("ci.pub"), PK).unwrap();
        std::fs::write(t.path().join(".hidden"), "not a key").unwrap();
        let anchors = anchors_in(t.path()).unwrap();
        assert_eq!(anchors.len(), 1);
        let sig = SecretKey::parse(SK).unwrap().sign(b"{manifest}") + "\n";
        let (s, m) = (Path::new("d.img.sig"), Path::new("d.img.layout.json"));
        let a = verify(s, &sig, m, b"{manifest}", &anchors).unwrap();
        assert_eq!(a.file, t.path().join("ci.pub"));
        let e = verify(s, &sig, m, b"{edited}", &anchors).unwrap_err();
        assert!(matches!(e, SigError::Mismatch { .. }), "{e}");
        let other = sig.replacen("test.example-1", "other-1", 1);
        let e = verify(s, &other, m, b"{manifest}", &anchors).unwrap_err();
        assert!(e
            .to_string()
            .contains("\"other-1\", which is not a trusted key"));
        let e = verify(s, "{\"not\": 1}", m, b"{manifest}", &anchors).unwrap_err();
        assert!(
            e.to_string().starts_with("d.img.sig: not a signature"),
            "{e}"
        );
        std::fs::write(t.path().join("bad.pub"), SK).unwrap();
        let e = anchors_in(t.path()).unwrap_err().to_string();
        assert!(e.contains("bad.pub: not a Nix public key"), "{e}");
    }
}
