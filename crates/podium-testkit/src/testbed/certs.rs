//! The testbed's PKI: one CA that signs the apiserver's serving certificate and every client
//! identity, plus the key pair that signs ServiceAccount tokens.
//!
//! ECDSA P-256 everywhere: key generation takes microseconds (RSA-2048 would add noticeable
//! startup time) and Go, rustls and kubectl all accept it.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// OID of the X.509 `organizationName` attribute. rcgen's `DistinguishedName` holds one value
/// per attribute type, so further `O=` values (Kubernetes reads every one as a group) are added
/// under a custom type carrying the same OID.
const ORGANIZATION_OID: [u64; 4] = [2, 5, 4, 10];

/// A client certificate and its key on disk.
#[derive(Clone, Debug)]
pub(crate) struct ClientIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub(crate) struct Pki {
    dir: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    pub ca_cert: PathBuf,
    pub ca_key_file: PathBuf,
    pub ca_der: Vec<u8>,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

impl Pki {
    /// Generates everything into `dir` (created if missing).
    pub fn generate(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "podium-testbed-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params
            .self_signed(&ca_key)
            .context("self-signing the CA")?;
        let ca_cert = write(dir, "ca.crt", &ca.pem())?;
        let ca_key_file = write(dir, "ca.key", &ca_key.serialize_pem())?;

        let mut pki = Pki {
            dir: dir.to_path_buf(),
            ca_params,
            ca_key,
            ca_cert,
            ca_key_file,
            ca_der: ca.der().to_vec(),
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
            service_account_key: PathBuf::new(),
            service_account_pub: PathBuf::new(),
        };

        // Clients reach the apiserver as 127.0.0.1 or localhost, or on a real node as the
        // bridge's 10.244.0.1; pods reach it as the `kubernetes` Service (10.96.0.1 and names).
        let sans = [
            "127.0.0.1",
            "10.244.0.1",
            "localhost",
            "10.96.0.1",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        let (cert, key) = pki.issue(
            "apiserver",
            "kube-apiserver",
            &[],
            &sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        pki.server_cert = cert;
        pki.server_key = key;

        let sa_key = KeyPair::generate().context("generating the service-account signing key")?;
        pki.service_account_key = write(dir, "sa.key", &sa_key.serialize_pem())?;
        pki.service_account_pub = write(dir, "sa.pub", &sa_key.public_key_pem())?;
        Ok(pki)
    }

    /// Issues a client certificate: Kubernetes takes the user name from CN and the groups from
    /// every O.
    pub fn issue_client(
        &self,
        file_stem: &str,
        common_name: &str,
        groups: &[&str],
    ) -> Result<ClientIdentity> {
        let (cert, key) = self.issue(
            file_stem,
            common_name,
            groups,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(ClientIdentity { cert, key })
    }

    fn issue(
        &self,
        file_stem: &str,
        common_name: &str,
        organizations: &[&str],
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<(PathBuf, PathBuf)> {
        if file_stem.is_empty()
            || !file_stem
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            bail!("invalid certificate file name {file_stem:?}");
        }
        let key = KeyPair::generate().context("generating a key")?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .with_context(|| format!("certificate parameters for {common_name}"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for (i, org) in organizations.iter().enumerate() {
            let ty = if i == 0 {
                DnType::OrganizationName
            } else {
                DnType::CustomDnType(ORGANIZATION_OID.to_vec())
            };
            params.distinguished_name.push(ty, *org);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing the certificate for {common_name}"))?;
        let cert_path = write(&self.dir, &format!("{file_stem}.crt"), &cert.pem())?;
        let key_path = write(&self.dir, &format!("{file_stem}.key"), &key.serialize_pem())?;
        Ok((cert_path, key_path))
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
