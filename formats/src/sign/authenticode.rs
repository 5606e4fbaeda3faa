//! Authenticode, what UEFI Secure Boot checks: the PE image's digest
//! (every byte but the checksum, the certificate table's directory entry
//! and the table itself; the headers, then the sections in file order,
//! then what follows them, counted as EDK2 and sbsign count), signed in a
//! PKCS#7 (`pkcs7::authenticode`) that a WIN_CERTIFICATE at the end of the
//! file carries, the image padded to 8 bytes before it.

use sha2::{Digest, Sha256};

use super::{pkcs7, KeyError, Signer};
use crate::pe::{layout, put32, u32_at, PeError, SECTION_HEADER};

/// Offsets in a PE32+ optional header: the checksum, the number of data
/// directories, and data directory 4 (the certificate table).
const CHECKSUM: usize = 64;
const DIRECTORIES: usize = 108;
const CERT_DIR: usize = 144;
/// WIN_CERTIFICATE: revision 2.0, type PKCS_SIGNED_DATA.
const WIN_CERT_REVISION: u16 = 0x0200;
const WIN_CERT_PKCS7: u16 = 0x0002;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error(transparent)]
    Pe(#[from] PeError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The certificate table's offset and size, if the image has one.
fn cert_table(b: &[u8]) -> Result<Option<(usize, usize)>, PeError> {
    let l = layout(b)?;
    if u32_at(b, l.optional + DIRECTORIES)? < 5 {
        return Err(PeError::NotPe("no certificate table directory"));
    }
    let at = u32_at(b, l.optional + CERT_DIR)? as usize;
    let size = u32_at(b, l.optional + CERT_DIR + 4)? as usize;
    match size {
        0 => Ok(None),
        // The table is file data after the headers (which hold its entry).
        _ if at < (l.size_of_headers as usize).max(l.optional + CERT_DIR + 8) => {
            Err(PeError::NotPe("a certificate table inside the headers"))
        }
        _ if at.checked_add(size).is_some_and(|end| end <= b.len()) => Ok(Some((at, size))),
        _ => Err(PeError::NotPe("a certificate table past the end")),
    }
}

/// The image without a signature: its certificate table (which must end
/// the file) cut off and the directory entry cleared.
pub fn unsigned(b: &[u8]) -> Result<Vec<u8>, PeError> {
    let Some((at, size)) = cert_table(b)? else {
        return Ok(b.to_vec());
    };
    if at + size != b.len() {
        return Err(PeError::NotPe(
            "a certificate table that does not end the file",
        ));
    }
    let mut out = b[..at].to_vec();
    let l = layout(&out)?;
    put32(&mut out, l.optional + CERT_DIR, 0);
    put32(&mut out, l.optional + CERT_DIR + 4, 0);
    Ok(out)
}

/// The Authenticode SHA-256 digest of a PE image.
pub fn digest(b: &[u8]) -> Result<[u8; 32], PeError> {
    let l = layout(b)?;
    let (sum, dir) = (l.optional + CHECKSUM, l.optional + CERT_DIR);
    let headers = l.size_of_headers as usize;
    if headers > b.len() || dir + 8 > headers {
        return Err(PeError::NotPe("headers past the end"));
    }
    let mut h = Sha256::new();
    h.update(&b[..sum]);
    h.update(&b[sum + 4..dir]);
    h.update(&b[dir + 8..headers]);
    let mut sections = Vec::with_capacity(l.count);
    for i in 0..l.count {
        let s = l.sections + i * SECTION_HEADER;
        let (raw, at) = (u32_at(b, s + 16)? as usize, u32_at(b, s + 20)? as usize);
        if raw > 0 {
            sections.push((at, raw));
        }
    }
    sections.sort_unstable();
    let mut hashed = headers;
    for (at, raw) in sections {
        let bytes = b
            .get(at..at + raw)
            .ok_or(PeError::NotPe("a section past the end"))?;
        h.update(bytes);
        hashed += raw;
    }
    let end = b.len() - cert_table(b)?.map_or(0, |(_, size)| size);
    if end > hashed {
        h.update(&b[hashed..end]);
    }
    Ok(h.finalize().into())
}

/// The image signed by `signer` (any signature it had replaced).
pub fn sign(b: &[u8], signer: &Signer) -> Result<Vec<u8>, SignError> {
    let mut out = unsigned(b)?;
    out.resize(out.len().next_multiple_of(8), 0);
    let der = pkcs7::authenticode(signer, &digest(&out)?)?;
    let size = (8 + der.len()).next_multiple_of(8);
    let at = out.len();
    if at + size > u32::MAX as usize {
        return Err(PeError::TooLarge.into());
    }
    let l = layout(&out)?;
    put32(&mut out, l.optional + CERT_DIR, at as u32);
    put32(&mut out, l.optional + CERT_DIR + 4, size as u32);
    out.extend_from_slice(&(size as u32).to_le_bytes());
    out.extend_from_slice(&WIN_CERT_REVISION.to_le_bytes());
    out.extend_from_slice(&WIN_CERT_PKCS7.to_le_bytes());
    out.extend_from_slice(&der);
    out.resize(at + size, 0);
    Ok(out)
}

/// What an image's signature says of it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Signature {
    /// Whether the digest it signs is the image's.
    pub digest_matches: bool,
    /// Whether it verifies with the certificate it carries (which says
    /// nothing of whether that certificate is trusted).
    pub valid: bool,
    /// The signing certificate's subject.
    pub signer: String,
}

impl Signature {
    /// Both: the signature is good and it is this image's.
    pub fn good(&self) -> bool {
        self.digest_matches && self.valid
    }
}

/// The image's Authenticode signature, if it has one.
pub fn signature(b: &[u8]) -> Result<Option<Signature>, PeError> {
    let Some((at, size)) = cert_table(b)? else {
        return Ok(None);
    };
    let der = b.get(at + 8..at + size).ok_or(PeError::NotPe(
        "a certificate table shorter than its header",
    ))?;
    let der = der.get(..der_len(der).unwrap_or(0)).unwrap_or_default();
    Ok(Some(match pkcs7::read_authenticode(der) {
        Some(a) => Signature {
            digest_matches: a.digest == digest(b)?,
            valid: a.valid,
            signer: a.signer,
        },
        None => Signature {
            digest_matches: false,
            valid: false,
            signer: String::new(),
        },
    }))
}

/// The length of the DER element `b` starts with (a WIN_CERTIFICATE pads
/// its PKCS#7 to 8 bytes).
fn der_len(b: &[u8]) -> Option<usize> {
    let first = *b.get(1)?;
    if first < 0x80 {
        return Some(2 + first as usize);
    }
    let n = (first & 0x7F) as usize;
    let len = b
        .get(2..2 + n)?
        .iter()
        .fold(0usize, |a, &x| (a << 8) | x as usize);
    Some(2 + n + len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::tests::test_signer;

    use crate::pe::test_image as image;

    #[test]
    fn signing_keeps_the_digest_and_appends_an_aligned_table() {
        let img = image();
        let signed = sign(&img, &test_signer()).unwrap();
        let dir = 0x84 + 20 + CERT_DIR;
        let mut expect = img.clone();
        expect[dir..dir + 8].copy_from_slice(&signed[dir..dir + 8]);
        assert_eq!(
            &signed[..img.len()],
            &expect[..],
            "only the directory entry changes"
        );
        assert_eq!(digest(&signed).unwrap(), digest(&img).unwrap());
        assert_eq!(signed.len() % 8, 0);
        let sig = signature(&signed).unwrap().unwrap();
        assert!(sig.good(), "{sig:?}");
        assert_eq!(sig.signer, "CN=nixforge unit tests (not secret)");
        assert_eq!(signature(&img).unwrap(), None);
        assert_eq!(
            sign(&signed, &test_signer()).unwrap(),
            signed,
            "re-signing replaces"
        );
        assert_eq!(unsigned(&signed).unwrap(), img);
    }

    #[test]
    fn a_changed_byte_no_longer_matches_and_the_checksum_does_not_count() {
        let signed = sign(&image(), &test_signer()).unwrap();
        let mut changed = signed.clone();
        changed[0x450] ^= 1;
        let sig = signature(&changed).unwrap().unwrap();
        assert!(!sig.digest_matches && sig.valid, "{sig:?}");
        let mut checksum = signed.clone();
        checksum[0x84 + 20 + CHECKSUM] ^= 1;
        assert!(signature(&checksum).unwrap().unwrap().good());
        // A byte of the signature itself changed: it no longer verifies.
        let mut forged = signed.clone();
        let n = forged.len();
        forged[n - 20] ^= 1;
        let sig = signature(&forged).unwrap().unwrap();
        assert!(sig.digest_matches && !sig.valid, "{sig:?}");
    }

    /// A signed image whose header fields (the PE offset, the section
    /// count, the optional header's size, the headers' size, each section's
    /// sizes and offsets, the certificate table's entry) take values at
    /// random, from the edges (0, small, near the file's length, huge) or
    /// any, some bytes anywhere set too, or cut short: every reader
    /// answers, none panics.
    #[test]
    fn mutated_images_never_panic_the_readers() {
        let signed = sign(&image(), &test_signer()).unwrap();
        let opt = 0x84 + 20;
        let mut fields = vec![0x3C, 0x84 + 2, 0x84 + 16, opt + 60, opt + DIRECTORIES];
        fields.extend([opt + CERT_DIR, opt + CERT_DIR + 4]);
        fields.extend((8..24).step_by(4).map(|o| opt + 240 + o));
        crate::fuzz::run("authenticode", 400, |r| {
            let mut b = signed.clone();
            let len = b.len() as u32;
            for _ in 0..1 + r.below(3) {
                let at = fields[r.below(fields.len())];
                let edges = [0, 8, 0x100, len - 0x100, len - 8, len, len + 8, u32::MAX];
                let v = match r.below(3) {
                    0 => r.word() as u32,
                    _ => edges[r.below(edges.len())],
                };
                let w = if at == 0x84 + 2 || at == 0x84 + 16 {
                    2
                } else {
                    4
                };
                b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            for _ in 0..r.below(3) {
                let i = r.below(b.len());
                b[i] = r.word() as u8;
            }
            if r.below(4) == 0 {
                b.truncate(r.below(b.len() + 1));
            }
            let _ = crate::pe::sections(&b);
            let _ = crate::pe::add_sections(&b, &[(".osrel", b"ID=x\n")]);
            let _ = digest(&b);
            let _ = signature(&b);
            let _ = unsigned(&b);
        });
    }

    #[test]
    fn a_certificate_table_inside_the_headers_is_an_error() {
        let mut b = image();
        let dir = 0x84 + 20 + CERT_DIR;
        let n = b.len() as u32;
        b[dir..dir + 4].copy_from_slice(&0x100u32.to_le_bytes());
        b[dir + 4..dir + 8].copy_from_slice(&(n - 0x100).to_le_bytes());
        assert!(unsigned(&b).is_err());
    }
}
