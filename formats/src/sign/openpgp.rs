//! OpenPGP (RFC 4880, version 4 packets) for what systemd's update tools
//! check with GnuPG: a detached binary signature (`SHA256SUMS.gpg`, as
//! systemd-pull verifies a downloaded `SHA256SUMS` with it) and the public
//! key a machine keeps in `/etc/systemd/import-pubring.gpg`, both made from
//! a Nix Ed25519 key ([`SecretKey`]) so one key signs both ways.
//!
//! The key is an EdDSA key (algorithm 22, curve Ed25519), created at time 0
//! (its fingerprint then depends on the key alone), with one user ID (the
//! Nix key's name) and its self-signature. Signatures use SHA-256; the
//! Ed25519 signature is over the digest, as OpenPGP's EdDSA defines, and is
//! deterministic, so the same key, data and time give the same bytes.

use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::nixkey::SecretKey;

/// Packet tags.
const SIGNATURE: u8 = 2;
const PUBLIC_KEY: u8 = 6;
const USER_ID: u8 = 13;
/// EdDSA (RFC 4880bis "EdDSALegacy"), and the Ed25519 curve's OID.
const EDDSA: u8 = 22;
const ED25519_OID: [u8; 9] = [0x2B, 0x06, 0x01, 0x04, 0x01, 0xDA, 0x47, 0x0F, 0x01];
const SHA256: u8 = 8;
/// Signature types: of a binary document; a positive certification of a
/// user ID (the self-signature).
const BINARY: u8 = 0x00;
const POSITIVE_CERT: u8 = 0x13;
/// Subpacket types.
const CREATED: u8 = 2;
const ISSUER: u8 = 16;
const KEY_FLAGS: u8 = 27;
const ISSUER_FPR: u8 = 33;
/// Key flags: may certify and sign.
const CERTIFY_SIGN: u8 = 0x03;

/// A packet: new-format header (tag, length), then `body`.
fn packet(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0xC0 | tag];
    match body.len() {
        n @ 0..=191 => out.push(n as u8),
        n @ 192..=8383 => {
            let m = n - 192;
            out.extend([(m >> 8) as u8 + 192, m as u8]);
        }
        n => {
            out.push(0xFF);
            out.extend((n as u32).to_be_bytes());
        }
    }
    out.extend_from_slice(body);
    out
}

/// A multiprecision integer: its bit count, then its bytes without
/// leading zeros.
fn mpi(bytes: &[u8]) -> Vec<u8> {
    let b = &bytes[bytes.iter().take_while(|&&x| x == 0).count()..];
    let bits = match b.first() {
        Some(&top) => (b.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    };
    let mut out = (bits as u16).to_be_bytes().to_vec();
    out.extend_from_slice(b);
    out
}

fn subpacket(ty: u8, data: &[u8]) -> Vec<u8> {
    let mut out = vec![(data.len() + 1) as u8, ty];
    out.extend_from_slice(data);
    out
}

/// The public key packet's body: version 4, created at 0, EdDSA on
/// Ed25519, the point as 0x40 and the 32 key bytes.
fn key_body(key: &SecretKey) -> Vec<u8> {
    let mut b = vec![4, 0, 0, 0, 0, EDDSA, ED25519_OID.len() as u8];
    b.extend(ED25519_OID);
    let mut point = vec![0x40];
    point.extend(key.ed25519().verifying_key().as_bytes());
    b.extend(mpi(&point));
    b
}

/// The key's body framed as fingerprints and certifications hash it
/// (0x99, its 2-byte length, the body).
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = vec![0x99];
    out.extend((body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The key's v4 fingerprint: SHA-1 of its framed body.
pub fn fingerprint(key: &SecretKey) -> [u8; 20] {
    Sha1::digest(framed(&key_body(key))).into()
}

/// A signature packet of type `ty` made at `time`, whose digest covers
/// `prefix` (what is signed) then the signature's hashed part and trailer.
fn signature(key: &SecretKey, ty: u8, time: u32, extra: &[u8], prefix: &[u8]) -> Vec<u8> {
    let fpr = fingerprint(key);
    let mut hashed = subpacket(CREATED, &time.to_be_bytes());
    hashed.extend_from_slice(extra);
    let mut issuer_fpr = vec![4];
    issuer_fpr.extend(fpr);
    hashed.extend(subpacket(ISSUER_FPR, &issuer_fpr));
    let mut part = vec![4, ty, EDDSA, SHA256];
    part.extend((hashed.len() as u16).to_be_bytes());
    part.extend(hashed);
    let mut h = Sha256::new();
    h.update(prefix);
    h.update(&part);
    h.update([4, 0xFF]);
    h.update((part.len() as u32).to_be_bytes());
    let digest: [u8; 32] = h.finalize().into();
    let sig = ed25519_dalek::Signer::sign(key.ed25519(), &digest).to_bytes();
    let unhashed = subpacket(ISSUER, &fpr[12..]);
    let mut body = part;
    body.extend((unhashed.len() as u16).to_be_bytes());
    body.extend(unhashed);
    body.extend(&digest[..2]);
    body.extend(mpi(&sig[..32]));
    body.extend(mpi(&sig[32..]));
    packet(SIGNATURE, &body)
}

/// The transferable public key (key, user ID, self-signature at time 0):
/// a keyring GnuPG reads with `--keyring`, such as
/// `/etc/systemd/import-pubring.gpg`.
pub fn public_keyring(key: &SecretKey) -> Vec<u8> {
    let body = key_body(key);
    let uid = key.name.as_bytes();
    let mut prefix = framed(&body);
    prefix.push(0xB4);
    prefix.extend((uid.len() as u32).to_be_bytes());
    prefix.extend(uid);
    let flags = subpacket(KEY_FLAGS, &[CERTIFY_SIGN]);
    let mut out = packet(PUBLIC_KEY, &body);
    out.extend(packet(USER_ID, uid));
    out.extend(signature(key, POSITIVE_CERT, 0, &flags, &prefix));
    out
}

/// A detached binary signature of `data`, made at `time` (seconds since
/// the epoch: SOURCE_DATE_EPOCH, so the bytes are reproducible).
pub fn detached_signature(key: &SecretKey, data: &[u8], time: u32) -> Vec<u8> {
    signature(key, BINARY, time, &[], data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        // nix-store --generate-binary-cache-key's format: seed, public.
        let seed = [7u8; 32];
        let k = ed25519_dalek::SigningKey::from_bytes(&seed);
        let mut b = seed.to_vec();
        b.extend(k.verifying_key().as_bytes());
        use base64::Engine;
        let text = format!(
            "ci.example-1:{}",
            base64::engine::general_purpose::STANDARD.encode(b)
        );
        SecretKey::parse(&text).unwrap()
    }

    #[test]
    fn mpis_count_bits_from_the_first_set_one() {
        assert_eq!(mpi(&[0, 0, 1]), [0, 1, 1]);
        assert_eq!(mpi(&[0x40, 0]), [0, 15, 0x40, 0]);
        assert_eq!(mpi(&[0xFF]), [0, 8, 0xFF]);
    }

    #[test]
    fn packet_lengths_take_one_two_or_five_bytes() {
        assert_eq!(packet(2, &[0; 191])[..2], [0xC2, 191]);
        assert_eq!(packet(2, &[0; 192])[..3], [0xC2, 192, 0]);
        assert_eq!(packet(2, &[0; 8383])[..3], [0xC2, 223, 255]);
        assert_eq!(packet(2, &[0; 8384])[..6], [0xC2, 0xFF, 0, 0, 0x20, 0xC0]);
    }

    /// The signature verifies with the public key over the digest the
    /// packet's own fields give, and the digest's first bytes are in it.
    #[test]
    fn a_detached_signature_verifies_over_its_digest_and_is_reproducible() {
        let k = key();
        let data = b"0123  nixos_2.efi\n";
        let sig = detached_signature(&k, data, 1_700_000_000);
        assert_eq!(sig, detached_signature(&k, data, 1_700_000_000));
        assert_eq!(sig[0], 0xC0 | SIGNATURE);
        let body = &sig[2..];
        assert_eq!(body[..4], [4, BINARY, EDDSA, SHA256]);
        let hl = u16::from_be_bytes([body[4], body[5]]) as usize;
        let part = &body[..6 + hl];
        let mut h = Sha256::new();
        h.update(data);
        h.update(part);
        h.update([4, 0xFF]);
        h.update((part.len() as u32).to_be_bytes());
        let digest: [u8; 32] = h.finalize().into();
        let ul = u16::from_be_bytes([body[6 + hl], body[7 + hl]]) as usize;
        let rest = &body[8 + hl + ul..];
        assert_eq!(rest[..2], digest[..2]);
        // r and s: 32 bytes each here unless a leading byte is zero.
        let (rbits, r) = (u16::from_be_bytes([rest[2], rest[3]]), &rest[4..]);
        let rlen = (rbits as usize).div_ceil(8);
        let sl = u16::from_be_bytes([r[rlen], r[rlen + 1]]) as usize;
        let mut raw = [0u8; 64];
        raw[32 - rlen..32].copy_from_slice(&r[..rlen]);
        raw[64 - sl.div_ceil(8)..].copy_from_slice(&r[rlen + 2..]);
        let sig = ed25519_dalek::Signature::from_bytes(&raw);
        use ed25519_dalek::Verifier;
        assert!(k.ed25519().verifying_key().verify(&digest, &sig).is_ok());
        // Issuer: the fingerprint's last 8 bytes, unhashed.
        assert_eq!(
            body[6 + hl + 2..6 + hl + 2 + ul][2..],
            fingerprint(&k)[12..]
        );
    }

    #[test]
    fn the_keyring_holds_the_key_its_name_and_a_self_signature() {
        let k = key();
        let ring = public_keyring(&k);
        assert_eq!(ring[0], 0xC0 | PUBLIC_KEY);
        let klen = ring[1] as usize;
        assert_eq!(&ring[2..2 + klen], &key_body(&k)[..]);
        let uid = &ring[2 + klen..];
        assert_eq!(uid[..2], [0xC0 | USER_ID, 12]);
        assert_eq!(&uid[2..14], b"ci.example-1");
        assert_eq!(uid[14], 0xC0 | SIGNATURE);
        assert_eq!(uid[16..20], [4, POSITIVE_CERT, EDDSA, SHA256]);
    }
}
