//! Who may tell this pod its role: the operator's ServiceAccount, in a token the cluster
//! signed for this pod's own audience ([`podium_core::notify::audience`]). [`Verifier`] checks one token against a JWKS and is pure;
//! [`Keys`] keeps the cluster's JWKS (from `/openid/v1/jwks`) fresh around it.
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use thiserror::Error;
use tokio::time::Instant;

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
    // The expected audience is not echoed: it would tell any caller this pod's UID and group.
    #[error("token audience is not this pod's")]
    Audience,
    #[error("token subject is not the operator's ServiceAccount")]
    Subject,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("token has no {0:?} claim")]
    MissingClaim(String),
    #[error("token issuer is not this cluster's ({0:?})")]
    Issuer(String),
    #[error("this pod does not know the cluster's token issuer yet")]
    IssuerUnknown,
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

/// Checks tokens against one JWKS and issuer: signature, issuer, audience, subject, `exp` and
/// `nbf`.
#[derive(Clone, Debug)]
pub struct Verifier {
    keys: JwkSet,
    subject: String,
    audience: String,
    /// The cluster's issuer; until it is known, every token is refused.
    issuer: Option<String>,
}

impl Verifier {
    /// Tokens must be signed by a key of `keys`, carry `sub == subject`, and name `audience`
    /// (this pod's own) among their audiences. Refuses every token until
    /// [`Verifier::with_issuer`] names the cluster's issuer.
    pub fn new(keys: JwkSet, subject: impl Into<String>, audience: impl Into<String>) -> Self {
        Verifier {
            keys,
            subject: subject.into(),
            audience: audience.into(),
            issuer: None,
        }
    }

    /// Tokens must also carry `iss == issuer`: a token another issuer signed with a key that
    /// happens to be in the set is not the cluster's.
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = Some(issuer.into());
        self
    }

    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    pub fn key_count(&self) -> usize {
        self.keys.keys.len()
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let Some(issuer) = self.issuer.as_deref() else {
            return Err(TokenError::IssuerUnknown);
        };
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
            match jsonwebtoken::decode::<Claims>(token, &key, &self.validation(alg, issuer)) {
                Ok(data) => return Ok(data.claims),
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    refusal = TokenError::BadSignature;
                }
                Err(e) => return Err(self.refused(e.kind())),
            }
        }
        Err(refusal)
    }

    fn validation(&self, alg: Algorithm, issuer: &str) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_audience(&[self.audience.as_str()]);
        validation.sub = Some(self.subject.clone());
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "aud", "sub", "iss"]);
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
            ErrorKind::InvalidAudience => TokenError::Audience,
            ErrorKind::InvalidSubject => TokenError::Subject,
            ErrorKind::InvalidIssuer => TokenError::Issuer(self.issuer.clone().unwrap_or_default()),
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
    #[error("reading {0} from the API server: {1}")]
    Request(&'static str, #[source] Box<kube::Error>),
    #[error("reading {0} from the API server: no answer within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("{JWKS_PATH} is not a JWKS: {0}")]
    Parse(#[source] serde_json::Error),
    #[error("{DISCOVERY_PATH} names no issuer: {0}")]
    Discovery(String),
}

/// Where the API server publishes its OpenID discovery document, whose `issuer` is what its
/// ServiceAccount tokens carry in `iss`.
pub const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// The longest issuer this pod believes from a discovery document: an issuer is a URL.
const MAX_ISSUER_LEN: usize = 2048;

/// The issuer of a discovery document.
pub fn parse_issuer(text: &str) -> Result<String, JwksError> {
    #[derive(Deserialize)]
    struct Discovery {
        issuer: Option<String>,
    }
    let discovery: Discovery =
        serde_json::from_str(text).map_err(|e| JwksError::Discovery(format!("not JSON: {e}")))?;
    match discovery.issuer {
        Some(issuer) if !issuer.is_empty() && issuer.len() <= MAX_ISSUER_LEN => Ok(issuer),
        Some(_) => Err(JwksError::Discovery(
            "the issuer is empty or too long".into(),
        )),
        None => Err(JwksError::Discovery("no \"issuer\" field".into())),
    }
}

/// The cluster's token keys and issuer, fetched with a Kubernetes client, refreshed
/// periodically and when a token names an unknown key.
pub struct Keys {
    client: kube::Client,
    subject: String,
    audience: String,
    verifier: RwLock<Arc<Verifier>>,
    /// Held across a fetch, so that concurrent verifications of unknown keys share one fetch
    /// instead of each making their own. Holds when the last fetch began.
    fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Fetches finished (or failed) so far: a verification that waited for the lock sees that
    /// the fetch it wanted has happened meanwhile.
    fetches: AtomicU64,
    /// [`Keys::MIN_REFETCH`], shorter in tests.
    min_refetch: Duration,
    /// [`Keys::REFETCH_WAIT`], shorter in tests.
    refetch_wait: Duration,
}

impl Keys {
    /// Refetches on an unknown `kid` happen at most this often, so forged tokens cannot make
    /// the pod hammer the API server: a rotated key is known within a minute of its first use.
    pub const MIN_REFETCH: Duration = Duration::from_secs(60);

    /// How soon the periodic refresh tries again after a failure (at start, until the API
    /// server answers, every token is refused).
    pub const RETRY: Duration = Duration::from_secs(5);

    /// How long one request to the API server may take.
    pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

    /// How long a verification waits for a refetch (its own or another's): a request with a
    /// forged key holds its connection no longer than this when the API server is slow.
    pub const REFETCH_WAIT: Duration = Duration::from_secs(5);

    /// Keys for tokens whose subject must be `subject` and whose audiences must include
    /// `audience`; empty, and the issuer unknown, until [`Keys::refresh`].
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
            fetch: tokio::sync::Mutex::new(None),
            fetches: AtomicU64::new(0),
            min_refetch: Self::MIN_REFETCH,
            refetch_wait: Self::REFETCH_WAIT,
        }
    }

    fn current(&self) -> Arc<Verifier> {
        self.verifier
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Verifies `token`, refetching the keys first if it names a key not yet known.
    pub async fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let seen = self.fetches.load(Ordering::Acquire);
        match self.current().verify(token) {
            Err(TokenError::UnknownKey(kid)) => {
                // Cut short, a fetch leaves its start recorded: the next is a minute away
                // either way, and the periodic refresh goes on.
                let refetched = tokio::time::timeout(self.refetch_wait, self.refetch(seen))
                    .await
                    .unwrap_or(false);
                if refetched {
                    self.current().verify(token)
                } else {
                    Err(TokenError::UnknownKey(kid))
                }
            }
            other => other,
        }
    }

    /// Fetches the keys unless a fetch finished after `seen` (then its keys are the newest) or
    /// one began less than [`Keys::MIN_REFETCH`] ago. Whether there may be new keys to try.
    async fn refetch(&self, seen: u64) -> bool {
        let mut last = self.fetch.lock().await;
        if self.fetches.load(Ordering::Acquire) != seen {
            return true;
        }
        if last.is_some_and(|at| at.elapsed() < self.min_refetch) {
            return false;
        }
        match self.fetch_locked(&mut last).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh the cluster's token keys");
                false
            }
        }
    }

    /// Fetches the issuer and the JWKS now; returns how many keys the JWKS holds.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let mut last = self.fetch.lock().await;
        self.fetch_locked(&mut last).await
    }

    async fn fetch_locked(&self, last: &mut Option<Instant>) -> Result<usize, JwksError> {
        *last = Some(Instant::now());
        let fetched = self.fetch_both().await;
        self.fetches.fetch_add(1, Ordering::AcqRel);
        let (issuer, keys) = fetched?;
        let count = keys.keys.len();
        *self
            .verifier
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(
            Verifier::new(keys, self.subject.clone(), self.audience.clone()).with_issuer(issuer),
        );
        tracing::debug!(keys = count, "refreshed the cluster's token keys");
        Ok(count)
    }

    async fn fetch_both(&self) -> Result<(String, JwkSet), JwksError> {
        let issuer = parse_issuer(&self.get(DISCOVERY_PATH).await?)?;
        let (keys, skipped) = parse_jwks(&self.get(JWKS_PATH).await?).map_err(JwksError::Parse)?;
        if skipped > 0 {
            tracing::warn!(skipped, "skipped JWKS keys of an unknown kind");
        }
        Ok((issuer, keys))
    }

    async fn get(&self, path: &'static str) -> Result<String, JwksError> {
        let request = http::Request::get(path)
            .body(Vec::new())
            .expect("a GET with a static path is a valid request");
        tokio::time::timeout(Self::FETCH_TIMEOUT, self.client.request_text(request))
            .await
            .map_err(|_| JwksError::Timeout(path, Self::FETCH_TIMEOUT))?
            .map_err(|e| JwksError::Request(path, Box::new(e)))
    }

    /// Refreshes every `every` (and retries after [`Keys::RETRY`] while that fails).
    pub fn spawn_refresh(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            // At start the first fetch may have failed: retry soon rather than after `every`.
            let mut wait = if self.current().issuer().is_some() {
                every
            } else {
                Self::RETRY.min(every)
            };
            loop {
                tokio::time::sleep(wait).await;
                wait = match self.refresh().await {
                    Ok(_) => every,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot refresh the cluster's token keys");
                        Self::RETRY.min(every)
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
    const ISSUER: &str = "https://kubernetes.default.svc";

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
            "iss": ISSUER,
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
        Verifier::new(set, OPERATOR, AUDIENCE).with_issuer(ISSUER)
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
            Err(TokenError::Audience)
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
                Err(TokenError::Audience),
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
    fn the_issuer_is_checked_and_unknown_refuses_everything() {
        let k = key("k1");
        let v = verifier(&[&k]);
        let mut foreign = good_claims();
        foreign["iss"] = json!("https://attacker.example");
        assert_eq!(
            v.verify(&sign(&k, &foreign)),
            Err(TokenError::Issuer(ISSUER.into()))
        );
        let mut no_iss = good_claims();
        no_iss.as_object_mut().unwrap().remove("iss");
        assert_eq!(
            v.verify(&sign(&k, &no_iss)),
            Err(TokenError::MissingClaim("iss".into()))
        );
        // Keys but no issuer yet: even a good token is refused.
        let text = json!({"keys": [k.jwk.clone()]}).to_string();
        let (set, _) = parse_jwks(&text).unwrap();
        let without = Verifier::new(set, OPERATOR, AUDIENCE);
        assert_eq!(
            without.verify(&sign(&k, &good_claims())),
            Err(TokenError::IssuerUnknown)
        );
        assert!(v.verify(&sign(&k, &good_claims())).is_ok());
    }

    #[test]
    fn discovery_documents() {
        assert_eq!(
            parse_issuer(r#"{"issuer":"https://kubernetes.default.svc","jwks_uri":"x"}"#).unwrap(),
            ISSUER
        );
        let long = format!(r#"{{"issuer":"{}"}}"#, "a".repeat(MAX_ISSUER_LEN + 1));
        for bad in [
            "",
            "{",
            "[]",
            r#"{"jwks_uri":"x"}"#,
            r#"{"issuer":""}"#,
            r#"{"issuer":7}"#,
            long.as_str(),
        ] {
            assert!(
                matches!(parse_issuer(bad), Err(JwksError::Discovery(_))),
                "{bad:?}"
            );
        }
    }

    /// A stand-in API server: serves `issuer` (or 500 while it is None) and the JWKS of
    /// `keys`, each after `delay`, and counts the JWKS requests.
    struct FakeApi {
        jwks: Arc<std::sync::Mutex<Value>>,
        issuer: Arc<std::sync::Mutex<Option<String>>>,
        fetches: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl FakeApi {
        fn new(keys: &[&Key]) -> FakeApi {
            FakeApi {
                jwks: Arc::new(std::sync::Mutex::new(
                    json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}),
                )),
                issuer: Arc::new(std::sync::Mutex::new(Some(ISSUER.into()))),
                fetches: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            }
        }

        fn set_keys(&self, keys: &[&Key]) {
            *self.jwks.lock().unwrap() =
                json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
        }

        fn fetches(&self) -> usize {
            self.fetches.load(Ordering::SeqCst)
        }

        fn keys(&self, delay: Duration) -> Keys {
            let (jwks, issuer, fetches) =
                (self.jwks.clone(), self.issuer.clone(), self.fetches.clone());
            let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
                let (jwks, issuer, fetches) = (jwks.clone(), issuer.clone(), fetches.clone());
                async move {
                    tokio::time::sleep(delay).await;
                    let (status, body) = match request.uri().path() {
                        JWKS_PATH => {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            (200, jwks.lock().unwrap().to_string())
                        }
                        DISCOVERY_PATH => match issuer.lock().unwrap().clone() {
                            Some(issuer) => (200, json!({ "issuer": issuer }).to_string()),
                            None => (500, "{}".into()),
                        },
                        _ => (404, "{}".into()),
                    };
                    let response = http::Response::builder()
                        .status(status)
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            Keys::new(kube::Client::new(service, "default"), OPERATOR, AUDIENCE)
        }
    }

    #[tokio::test]
    async fn unknown_keys_are_refetched_once_for_many_and_at_most_once_a_minute() {
        let k1 = key("k1");
        let api = FakeApi::new(&[&k1]);
        let mut keys = api.keys(Duration::from_millis(100));
        keys.min_refetch = Duration::from_millis(500);
        let keys = Arc::new(keys);
        assert_eq!(keys.refresh().await.unwrap(), 1);
        assert_eq!(api.fetches(), 1);
        assert!(keys.verify(&sign(&k1, &good_claims())).await.is_ok());

        // A rotated key: the first tokens signed with it are verified after one refetch,
        // however many arrive at once.
        let k2 = key("k2");
        api.set_keys(&[&k1, &k2]);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let token = sign(&k2, &good_claims());
        let verifications: Vec<_> = (0..20)
            .map(|_| {
                let (keys, token) = (keys.clone(), token.clone());
                tokio::spawn(async move { keys.verify(&token).await })
            })
            .collect();
        for verification in verifications {
            assert!(verification.await.unwrap().is_ok());
        }
        assert_eq!(api.fetches(), 2);

        // Forged kids: one refetch, then none until the interval has passed.
        let forged = sign(&key("k9"), &good_claims());
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..20 {
            assert_eq!(
                keys.verify(&forged).await,
                Err(TokenError::UnknownKey("k9".into()))
            );
        }
        assert_eq!(api.fetches(), 3);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(keys.verify(&forged).await.is_err());
        assert_eq!(api.fetches(), 4);
    }

    #[tokio::test]
    async fn a_slow_api_server_holds_a_verification_no_longer_than_the_refetch_wait() {
        let k = key("k1");
        let api = FakeApi::new(&[&k]);
        let mut keys = api.keys(Duration::from_secs(3));
        keys.refetch_wait = Duration::from_millis(300);
        keys.min_refetch = Duration::ZERO;
        let started = Instant::now();
        assert_eq!(
            keys.verify(&sign(&key("k9"), &good_claims())).await,
            Err(TokenError::IssuerUnknown)
        );
        // With keys and an issuer, but the API server slow for the refetch.
        let fast = api.keys(Duration::ZERO);
        fast.refresh().await.unwrap();
        keys.verifier = RwLock::new(fast.current());
        let started_slow = Instant::now();
        assert_eq!(
            keys.verify(&sign(&key("k9"), &good_claims())).await,
            Err(TokenError::UnknownKey("k9".into()))
        );
        let took = started_slow.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn every_token_is_refused_until_the_issuer_is_known() {
        let k = key("k1");
        let api = FakeApi::new(&[&k]);
        *api.issuer.lock().unwrap() = None;
        let keys = api.keys(Duration::ZERO);
        assert!(matches!(
            keys.refresh().await,
            Err(JwksError::Request(DISCOVERY_PATH, _))
        ));
        let token = sign(&k, &good_claims());
        assert_eq!(keys.verify(&token).await, Err(TokenError::IssuerUnknown));
        *api.issuer.lock().unwrap() = Some("https://other.example".into());
        keys.refresh().await.unwrap();
        assert_eq!(
            keys.verify(&token).await,
            Err(TokenError::Issuer("https://other.example".into()))
        );
        *api.issuer.lock().unwrap() = Some(ISSUER.into());
        keys.refresh().await.unwrap();
        assert!(keys.verify(&token).await.is_ok());
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
