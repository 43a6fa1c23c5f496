//! Who may tell this pod its role: the operator's ServiceAccount, in a token the cluster
//! signed for this pod's own audience ([`podium_core::notify::audience`]). [`Verifier`] checks one token against a JWKS and is pure;
//! [`Keys`] keeps the cluster's JWKS (from `/openid/v1/jwks`) fresh around it.
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use thiserror::Error;

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECS: u64 = 5;

/// What Kubernetes signs ServiceAccount tokens with: RS256 for RSA keys, ES256 and ES384 for
/// P-256 and P-384 keys. Nothing symmetric, so a public key can never serve as an HMAC secret.
const ACCEPTED: &[Algorithm] = &[Algorithm::RS256, Algorithm::ES256, Algorithm::ES384];

/// Where the API server publishes its ServiceAccount token keys.
pub const JWKS_PATH: &str = "/openid/v1/jwks";

/// Why a token was refused. Each reason is its own variant so that a 401 says which check failed.
#[derive(Error, Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("unsigned token (alg \"none\") refused")]
    Unsigned,
    #[error("token algorithm {0:?} is not accepted (RS256, ES256 or ES384)")]
    Algorithm(String),
    #[error("token signed by a key this pod does not know (kid {0:?})")]
    UnknownKey(String),
    #[error("key {kid:?} is not a {alg} key")]
    KeyMismatch { kid: String, alg: String },
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token audience is not this pod's ({0:?})")]
    Audience(String),
    #[error("token subject is not the operator's ServiceAccount")]
    Subject,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("token has no {0:?} claim")]
    MissingClaim(String),
}

/// The claims of a verified token that `podium exec` uses.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    // Defaults, so that a missing claim reaches the validation and is named there.
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub exp: u64,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
}

/// Checks tokens against one JWKS: signature, audience, subject, `exp` and `nbf`.
#[derive(Clone, Debug)]
pub struct Verifier {
    keys: JwkSet,
    subject: String,
    audience: String,
}

impl Verifier {
    /// Tokens must be signed by a key of `keys`, carry `sub == subject`, and name `audience`
    /// (this pod's own) among their audiences.
    pub fn new(keys: JwkSet, subject: impl Into<String>, audience: impl Into<String>) -> Self {
        Verifier {
            keys,
            subject: subject.into(),
            audience: audience.into(),
        }
    }

    pub fn key_count(&self) -> usize {
        self.keys.keys.len()
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let parts: Vec<&str> = token.split('.').collect();
        let [header, _, _] = parts[..] else {
            return Err(TokenError::Malformed(
                "not three dot-separated parts".into(),
            ));
        };
        let header = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|e| TokenError::Malformed(format!("header is not base64url: {e}")))?;
        let header: RawHeader = serde_json::from_slice(&header)
            .map_err(|e| TokenError::Malformed(format!("header is not JSON: {e}")))?;
        let alg_name = header.alg.unwrap_or_default();
        if alg_name.is_empty() || alg_name.eq_ignore_ascii_case("none") {
            return Err(TokenError::Unsigned);
        }
        let alg = Algorithm::from_str(&alg_name)
            .ok()
            .filter(|alg| ACCEPTED.contains(alg))
            .ok_or_else(|| TokenError::Algorithm(alg_name.clone()))?;
        let kid = header.kid.unwrap_or_default();
        // Kubernetes always names the key; without a kid, any key of the set may have signed.
        let candidates: Vec<&Jwk> = self
            .keys
            .keys
            .iter()
            .filter(|jwk| kid.is_empty() || jwk.common.key_id.as_deref() == Some(kid.as_str()))
            .collect();
        if candidates.is_empty() {
            return Err(TokenError::UnknownKey(kid));
        }
        let mut refusal = TokenError::KeyMismatch {
            kid: kid.clone(),
            alg: alg_name.clone(),
        };
        for jwk in candidates.into_iter().filter(|jwk| fits(jwk, alg)) {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match jsonwebtoken::decode::<Claims>(token, &key, &self.validation(alg)) {
                Ok(data) => return Ok(data.claims),
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    refusal = TokenError::BadSignature;
                }
                Err(e) => return Err(self.refused(e.kind())),
            }
        }
        Err(refusal)
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_audience(&[self.audience.as_str()]);
        validation.sub = Some(self.subject.clone());
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        validation
    }
}

/// Whether `jwk` can have made an `alg` signature: the key type and curve must match, and so
/// must the key's own `alg` when it names one.
fn fits(jwk: &Jwk, alg: Algorithm) -> bool {
    if let Some(key_alg) = jwk.common.key_algorithm
        && Algorithm::from_str(&key_alg.to_string()).ok() != Some(alg)
    {
        return false;
    }
    match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256) => true,
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
            ec.curve == EllipticCurve::P256
        }
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES384) => {
            ec.curve == EllipticCurve::P384
        }
        _ => false,
    }
}

impl Verifier {
    fn refused(&self, kind: &ErrorKind) -> TokenError {
        match kind {
            ErrorKind::InvalidSignature | ErrorKind::Crypto(_) => TokenError::BadSignature,
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::InvalidAudience => TokenError::Audience(self.audience.clone()),
            ErrorKind::InvalidSubject => TokenError::Subject,
            ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(claim.clone()),
            ErrorKind::InvalidAlgorithm => TokenError::Algorithm("for this key".into()),
            other => TokenError::Malformed(format!("{other:?}")),
        }
    }
}

/// Parses a JWKS document, skipping keys this crate cannot read (a key type from the future
/// must not lock out the others). Returns the set and how many keys were skipped.
pub fn parse_jwks(text: &str) -> Result<(JwkSet, usize), serde_json::Error> {
    #[derive(Deserialize)]
    struct Loose {
        keys: Vec<serde_json::Value>,
    }
    let loose: Loose = serde_json::from_str(text)?;
    let total = loose.keys.len();
    let keys: Vec<Jwk> = loose
        .keys
        .into_iter()
        .filter_map(|key| serde_json::from_value(key).ok())
        .collect();
    let skipped = total - keys.len();
    Ok((JwkSet { keys }, skipped))
}

#[derive(Error, Debug)]
pub enum JwksError {
    #[error("reading {JWKS_PATH} from the API server: {0}")]
    Request(#[source] kube::Error),
    #[error("{JWKS_PATH} is not a JWKS: {0}")]
    Parse(#[source] serde_json::Error),
}

/// The cluster's token keys, fetched with a Kubernetes client, refreshed periodically and when
/// a token names an unknown key (at most once per [`Keys::MIN_REFETCH`]).
pub struct Keys {
    client: kube::Client,
    subject: String,
    audience: String,
    verifier: RwLock<Arc<Verifier>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl Keys {
    /// Refetches on an unknown `kid` happen at most this often, so forged tokens cannot make
    /// the pod hammer the API server.
    pub const MIN_REFETCH: Duration = Duration::from_secs(5);

    /// Keys for tokens whose subject must be `subject` and whose audiences must include
    /// `audience`; empty until [`Keys::refresh`].
    pub fn new(
        client: kube::Client,
        subject: impl Into<String>,
        audience: impl Into<String>,
    ) -> Self {
        let subject = subject.into();
        let audience = audience.into();
        Keys {
            client,
            verifier: RwLock::new(Arc::new(Verifier::new(
                JwkSet { keys: vec![] },
                subject.clone(),
                audience.clone(),
            ))),
            subject,
            audience,
            last_fetch: tokio::sync::Mutex::new(None),
        }
    }

    fn current(&self) -> Arc<Verifier> {
        self.verifier
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Verifies `token`, refetching the JWKS first if it names a key not yet known.
    pub async fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        match self.current().verify(token) {
            Err(TokenError::UnknownKey(kid)) => {
                if self.refresh_if_due().await {
                    self.current().verify(token)
                } else {
                    Err(TokenError::UnknownKey(kid))
                }
            }
            other => other,
        }
    }

    async fn refresh_if_due(&self) -> bool {
        let last = self.last_fetch.lock().await;
        if last.is_some_and(|at| at.elapsed() < Self::MIN_REFETCH) {
            return false;
        }
        drop(last);
        match self.refresh().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh the cluster's token keys");
                false
            }
        }
    }

    /// Fetches the JWKS now; returns how many keys it holds.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let mut last = self.last_fetch.lock().await;
        *last = Some(Instant::now());
        let request = http::Request::get(JWKS_PATH)
            .body(Vec::new())
            .expect("a GET with a static path is a valid request");
        let text = self
            .client
            .request_text(request)
            .await
            .map_err(JwksError::Request)?;
        let (keys, skipped) = parse_jwks(&text).map_err(JwksError::Parse)?;
        if skipped > 0 {
            tracing::warn!(skipped, "skipped JWKS keys of an unknown kind");
        }
        let count = keys.keys.len();
        *self
            .verifier
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(Verifier::new(
            keys,
            self.subject.clone(),
            self.audience.clone(),
        ));
        tracing::debug!(keys = count, "refreshed the cluster's token keys");
        Ok(count)
    }

    /// Refreshes every `every` (and retries after [`Keys::MIN_REFETCH`] while that fails).
    pub fn spawn_refresh(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut wait = every;
            loop {
                tokio::time::sleep(wait).await;
                wait = match self.refresh().await {
                    Ok(_) => every,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot refresh the cluster's token keys");
                        Self::MIN_REFETCH.min(every)
                    }
                };
            }
        })
    }
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, TokenError> {
    let value = header.ok_or(TokenError::Missing)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(TokenError::Missing)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(TokenError::Missing);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use serde_json::{Value, json};

    const OPERATOR: &str = "system:serviceaccount:podium-system:podium";
    const AUDIENCE: &str = "podium.dev/notify/ns/g/u0";

    struct Key {
        kid: String,
        pkcs8: Vec<u8>,
        jwk: Value,
    }

    fn key(kid: &str) -> Key {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap()
            .as_ref()
            .to_vec();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng).unwrap();
        // Uncompressed point: 0x04, x, y.
        let point = pair.public_key().as_ref();
        assert_eq!(point.len(), 65);
        let jwk = json!({
            "use": "sig", "kty": "EC", "kid": kid, "crv": "P-256", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..]),
        });
        Key {
            kid: kid.into(),
            pkcs8,
            jwk,
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims(aud: &str, sub: &str, exp: u64) -> Value {
        // As the API server writes them.
        json!({
            "aud": [aud], "sub": sub, "exp": exp, "iat": now(), "nbf": now(),
            "iss": "https://kubernetes.default.svc",
            "kubernetes.io": {"namespace": "podium-system", "serviceaccount": {"name": "podium"}},
        })
    }

    fn sign(key: &Key, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&key.pkcs8)).unwrap()
    }

    fn verifier(keys: &[&Key]) -> Verifier {
        let text = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
        let (set, skipped) = parse_jwks(&text.to_string()).unwrap();
        assert_eq!(skipped, 0);
        Verifier::new(set, OPERATOR, AUDIENCE)
    }

    fn good_claims() -> Value {
        claims(AUDIENCE, OPERATOR, now() + 600)
    }

    #[test]
    fn a_good_token_verifies() {
        let k = key("k1");
        let other = key("k0");
        let claims = verifier(&[&other, &k])
            .verify(&sign(&k, &good_claims()))
            .unwrap();
        assert_eq!(claims.sub, OPERATOR);
    }

    #[test]
    fn each_failed_check_has_its_own_refusal() {
        let k = key("k1");
        let v = verifier(&[&k]);
        let check = |claims: Value| v.verify(&sign(&k, &claims));
        assert_eq!(
            check(claims(
                "https://kubernetes.default.svc",
                OPERATOR,
                now() + 600
            )),
            Err(TokenError::Audience(AUDIENCE.into()))
        );
        // The token of another pod, another group or another namespace.
        for other in [
            "podium.dev/notify/ns/g/u1",
            "podium.dev/notify/ns/h/u0",
            "podium.dev/notify/other/g/u0",
            "podium.dev/notify",
        ] {
            assert_eq!(
                check(claims(other, OPERATOR, now() + 600)),
                Err(TokenError::Audience(AUDIENCE.into())),
                "{other}"
            );
        }
        assert_eq!(
            check(claims(
                AUDIENCE,
                "system:serviceaccount:ns:other",
                now() + 600
            )),
            Err(TokenError::Subject)
        );
        // Past the leeway.
        assert_eq!(
            check(claims(AUDIENCE, OPERATOR, now() - LEEWAY_SECS - 2)),
            Err(TokenError::Expired)
        );
        let mut early = good_claims();
        early["nbf"] = json!(now() + 120);
        assert_eq!(check(early), Err(TokenError::NotYetValid));
        let mut no_sub = good_claims();
        no_sub.as_object_mut().unwrap().remove("sub");
        assert_eq!(check(no_sub), Err(TokenError::MissingClaim("sub".into())));
    }

    #[test]
    fn an_expired_token_within_the_leeway_still_verifies() {
        let k = key("k1");
        let token = sign(&k, &claims(AUDIENCE, OPERATOR, now() - 1));
        assert!(verifier(&[&k]).verify(&token).is_ok());
    }

    #[test]
    fn another_keys_signature_is_refused() {
        let k = key("k1");
        let v = verifier(&[&k]);
        // Another key under its own kid: unknown, so the caller refetches the JWKS first.
        let stranger = key("k9");
        assert_eq!(
            v.verify(&sign(&stranger, &good_claims())),
            Err(TokenError::UnknownKey("k9".into()))
        );
        // Another key claiming the known kid.
        let impostor = key("k1");
        assert_eq!(
            v.verify(&sign(&impostor, &good_claims())),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn a_tampered_payload_is_refused() {
        let k = key("k1");
        let v = verifier(&[&k]);
        // Signed for another subject, then the payload rewritten to name the operator.
        let token = sign(
            &k,
            &claims(AUDIENCE, "system:serviceaccount:ns:other", now() + 600),
        );
        let parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(good_claims().to_string());
        let tampered = format!("{}.{}.{}", parts[0], forged, parts[2]);
        assert_eq!(v.verify(&tampered), Err(TokenError::BadSignature));
        // A signature with one byte flipped.
        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[10] ^= 1;
        let flipped = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
        assert_eq!(v.verify(&flipped), Err(TokenError::BadSignature));
    }

    #[test]
    fn unsigned_and_symmetric_tokens_are_refused() {
        let k = key("k1");
        let v = verifier(&[&k]);
        let payload = URL_SAFE_NO_PAD.encode(good_claims().to_string());
        for alg in ["none", "None"] {
            let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "kid": "k1"}).to_string());
            assert_eq!(
                v.verify(&format!("{header}.{payload}.")),
                Err(TokenError::Unsigned)
            );
        }
        // HS256 "signed" with the public key's bytes: the classic key-confusion attack.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let token = jsonwebtoken::encode(
            &header,
            &good_claims(),
            &EncodingKey::from_secret(k.jwk.to_string().as_bytes()),
        )
        .unwrap();
        assert_eq!(v.verify(&token), Err(TokenError::Algorithm("HS256".into())));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let v = verifier(&[&key("k1")]);
        for token in ["", "a.b", "a.b.c", "!!.??.**", "e30.e30.e30", "a.b.c.d"] {
            let refusal = v.verify(token).unwrap_err();
            assert!(
                matches!(
                    refusal,
                    TokenError::Malformed(_) | TokenError::Unsigned | TokenError::Algorithm(_)
                ),
                "{token:?}: {refusal}"
            );
        }
    }

    #[test]
    fn unknown_key_kinds_in_the_jwks_are_skipped() {
        let k = key("k1");
        let text = json!({"keys": [{"kty": "future", "kid": "x"}, k.jwk]}).to_string();
        let (set, skipped) = parse_jwks(&text).unwrap();
        assert_eq!((set.keys.len(), skipped), (1, 1));
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer(None), Err(TokenError::Missing));
        assert_eq!(bearer(Some("Basic abc")), Err(TokenError::Missing));
        assert_eq!(bearer(Some("Bearer")), Err(TokenError::Missing));
    }
}
