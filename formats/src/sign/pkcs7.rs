//! PKCS#7 SignedData, version 1, RSA with SHA-256, the signer's
//! certificate included, no signing time (so the bytes are the same each
//! time): Authenticode's (a PE image's digest in an SpcIndirectDataContent,
//! with the signed attributes Windows' and sbsign's signatures carry) and a
//! detached one without attributes (what `systemd-repart` puts in a
//! root-verity-sig partition, and what the kernel checks a root hash with).

use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::{CmsVersion, ContentInfo};
use cms::signed_data::{
    CertificateSet, EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
};
use der::asn1::{ObjectIdentifier, OctetString, SetOfVec};
use der::{Any, Decode, Encode};
use sha2::{Digest, Sha256};
use spki::AlgorithmIdentifierOwned;
use x509_cert::attr::Attribute;

use super::{KeyError, Signer};

const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");
/// Authenticode: SPC_INDIRECT_DATA_OBJID, SPC_PE_IMAGE_DATAOBJ, SPC_SP_OPUS_INFO_OBJID.
pub const SPC_INDIRECT_DATA: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.4");
const SPC_PE_IMAGE_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.15");
const SPC_SP_OPUS_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.311.2.1.12");

fn der_err(e: der::Error) -> KeyError {
    KeyError::Sign(e.to_string())
}

/// One DER TLV with a short tag.
fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    let n = body.len();
    if n < 0x80 {
        v.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        v.push(0x80 | bytes.len() as u8);
        v.extend(bytes);
    }
    v.extend_from_slice(body);
    v
}

fn algorithm(oid: ObjectIdentifier) -> AlgorithmIdentifierOwned {
    AlgorithmIdentifierOwned {
        oid,
        parameters: Some(Any::null()),
    }
}

/// SpcIndirectDataContent for a PE image with SHA-256 digest `digest`:
/// the PE image data as signtool and sbsign write it (no flags, the file
/// link "<<<Obsolete>>>"), then the DigestInfo.
pub fn indirect_data(digest: &[u8; 32]) -> Result<Vec<u8>, KeyError> {
    let obsolete: Vec<u8> = "<<<Obsolete>>>"
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect();
    let link = tlv(0xA0, &tlv(0xA2, &tlv(0x80, &obsolete)));
    let pe_image_data = tlv(0x30, &[&[0x03, 0x01, 0x00][..], &link].concat());
    let oid = SPC_PE_IMAGE_DATA.to_der().map_err(der_err)?;
    let data = tlv(0x30, &[oid, pe_image_data].concat());
    let alg = algorithm(SHA256).to_der().map_err(der_err)?;
    let digest_info = tlv(0x30, &[alg, tlv(0x04, digest)].concat());
    Ok(tlv(0x30, &[data, digest_info].concat()))
}

/// The value of a DER TLV (its bytes after tag and length).
fn value_of(der: &[u8]) -> &[u8] {
    let len_bytes = match der[1] {
        n if n < 0x80 => 0,
        n => (n & 0x7F) as usize,
    };
    &der[2 + len_bytes..]
}

fn attribute(oid: ObjectIdentifier, value_der: &[u8]) -> Result<Attribute, KeyError> {
    let value = Any::from_der(value_der).map_err(der_err)?;
    Ok(Attribute {
        oid,
        values: SetOfVec::try_from(vec![value]).map_err(der_err)?,
    })
}

/// A SignedData of `content_type`, signed by `signer` with `signed_attrs`
/// (over their DER as a SET) or, without them, over `content` itself.
fn signed_data(
    signer: &Signer,
    content_type: ObjectIdentifier,
    econtent: Option<Any>,
    signed_attrs: Option<Vec<Attribute>>,
    content: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let signed_attrs = signed_attrs
        .map(|a| SetOfVec::try_from(a).map_err(der_err))
        .transpose()?;
    let signature = match &signed_attrs {
        Some(a) => signer.sign(&a.to_der().map_err(der_err)?)?,
        None => signer.sign(content)?,
    };
    let cert = signer.certificate();
    let info = SignerInfo {
        version: CmsVersion::V1,
        sid: SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
            issuer: cert.tbs_certificate.issuer.clone(),
            serial_number: cert.tbs_certificate.serial_number.clone(),
        }),
        digest_alg: algorithm(SHA256),
        signed_attrs,
        signature_algorithm: algorithm(RSA),
        signature: OctetString::new(signature).map_err(der_err)?,
        unsigned_attrs: None,
    };
    let certs = vec![CertificateChoices::Certificate(cert.clone())];
    let sd = SignedData {
        version: CmsVersion::V1,
        digest_algorithms: SetOfVec::try_from(vec![algorithm(SHA256)]).map_err(der_err)?,
        encap_content_info: EncapsulatedContentInfo {
            econtent_type: content_type,
            econtent,
        },
        certificates: Some(CertificateSet(SetOfVec::try_from(certs).map_err(der_err)?)),
        crls: None,
        signer_infos: SignerInfos(SetOfVec::try_from(vec![info]).map_err(der_err)?),
    };
    let ci = ContentInfo {
        content_type: SIGNED_DATA,
        content: Any::encode_from(&sd).map_err(der_err)?,
    };
    ci.to_der().map_err(der_err)
}

/// Authenticode's signature of a PE image whose Authenticode digest is
/// `digest`: its content type, the digest of the SpcIndirectDataContent's
/// value and an empty SpcSpOpusInfo as signed attributes.
pub fn authenticode(signer: &Signer, digest: &[u8; 32]) -> Result<Vec<u8>, KeyError> {
    let idc = indirect_data(digest)?;
    let idc_digest: [u8; 32] = Sha256::digest(value_of(&idc)).into();
    let attrs = vec![
        attribute(CONTENT_TYPE, &SPC_INDIRECT_DATA.to_der().map_err(der_err)?)?,
        attribute(MESSAGE_DIGEST, &tlv(0x04, &idc_digest))?,
        attribute(SPC_SP_OPUS_INFO, &[0x30, 0x00])?,
    ];
    let econtent = Any::from_der(&idc).map_err(der_err)?;
    signed_data(signer, SPC_INDIRECT_DATA, Some(econtent), Some(attrs), &idc)
}

/// A detached signature of `content` without signed attributes
/// (`openssl smime -sign -binary -noattr`, what systemd-repart makes of a
/// root hash).
pub fn detached(signer: &Signer, content: &[u8]) -> Result<Vec<u8>, KeyError> {
    signed_data(signer, DATA, None, None, content)
}

/// What an Authenticode signature says, read back and checked against
/// the certificate it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticode {
    /// The PE image digest it vouches for.
    pub digest: [u8; 32],
    /// The signer certificate's subject (RFC 4514).
    pub signer: String,
    /// Whether its signed attributes name the content it carries and the
    /// RSA signature over them verifies with the signer's certificate.
    pub valid: bool,
}

/// An Authenticode signature's DER read and checked (None: not one).
pub fn read_authenticode(der: &[u8]) -> Option<Authenticode> {
    let ci = ContentInfo::from_der(der).ok()?;
    let sd: SignedData = ci.content.decode_as().ok()?;
    if sd.encap_content_info.econtent_type != SPC_INDIRECT_DATA {
        return None;
    }
    let idc = sd.encap_content_info.econtent.as_ref()?.to_der().ok()?;
    let digest: [u8; 32] = idc.get(idc.len().checked_sub(32)?..)?.try_into().ok()?;
    let info = sd.signer_infos.0.get(0)?;
    let cert = signer_cert(&sd, info)?;
    let signer = cert.tbs_certificate.subject.to_string();
    let valid = verify_signer(info, cert, &Sha256::digest(value_of(&idc))).unwrap_or(false);
    Some(Authenticode {
        digest,
        signer,
        valid,
    })
}

/// A detached signature without signed attributes (`detached`): the
/// signer's subject, and whether it verifies over `content` with the
/// certificate it carries (None: not such a signature).
pub fn read_detached(der: &[u8], content: &[u8]) -> Option<(String, bool)> {
    use rsa::signature::Verifier;
    let ci = ContentInfo::from_der(der).ok()?;
    let sd: SignedData = ci.content.decode_as().ok()?;
    let info = sd.signer_infos.0.get(0)?;
    let cert = signer_cert(&sd, info)?;
    let key = verifying_key(cert)?;
    let sig = rsa::pkcs1v15::Signature::try_from(info.signature.as_bytes()).ok()?;
    let valid = info.signed_attrs.is_none() && key.verify(content, &sig).is_ok();
    Some((cert.tbs_certificate.subject.to_string(), valid))
}

/// The certificate a SignedData carries for its signer.
fn signer_cert<'a>(sd: &'a SignedData, info: &SignerInfo) -> Option<&'a x509_cert::Certificate> {
    let SignerIdentifier::IssuerAndSerialNumber(sid) = &info.sid else {
        return None;
    };
    sd.certificates.as_ref()?.0.iter().find_map(|c| match c {
        CertificateChoices::Certificate(c)
            if c.tbs_certificate.serial_number == sid.serial_number
                && c.tbs_certificate.issuer == sid.issuer =>
        {
            Some(c)
        }
        _ => None,
    })
}

fn verifying_key(cert: &x509_cert::Certificate) -> Option<rsa::pkcs1v15::VerifyingKey<Sha256>> {
    let spki = cert.tbs_certificate.subject_public_key_info.to_der().ok()?;
    let public =
        <rsa::RsaPublicKey as rsa::pkcs8::DecodePublicKey>::from_public_key_der(&spki).ok()?;
    Some(rsa::pkcs1v15::VerifyingKey::new(public))
}

/// The signer's message-digest attribute is `content_digest`, and its RSA
/// PKCS#1 v1.5 SHA-256 signature over the signed attributes verifies.
fn verify_signer(
    info: &SignerInfo,
    cert: &x509_cert::Certificate,
    content_digest: &[u8],
) -> Option<bool> {
    use rsa::signature::Verifier;
    let attrs = info.signed_attrs.as_ref()?;
    let md = attrs
        .iter()
        .find(|a| a.oid == MESSAGE_DIGEST)?
        .values
        .get(0)?;
    let named = OctetString::from_der(&md.to_der().ok()?).ok()?;
    if named.as_bytes() != content_digest {
        return Some(false);
    }
    let key = verifying_key(cert)?;
    let sig = rsa::pkcs1v15::Signature::try_from(info.signature.as_bytes()).ok()?;
    Some(key.verify(&attrs.to_der().ok()?, &sig).is_ok())
}
