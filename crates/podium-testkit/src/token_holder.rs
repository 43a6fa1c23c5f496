//! What anyone holding a notification token can do, for the tests that attack `podium exec`
//! or read its full `/role`: mint a genuine token through the TokenRequest API (what the
//! operator does, or whoever may create tokens for its ServiceAccount), and POST a role message
//! with it over a plain HTTP/1.1 connection.
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Creates namespace `namespace` and ServiceAccount `name` in it, unless they exist.
pub async fn ensure_service_account(client: &Client, namespace: &str, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({ "metadata": { "name": namespace } }))?;
    create_unless_exists(&namespaces, &ns).await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let account: ServiceAccount = serde_json::from_value(json!({ "metadata": { "name": name } }))?;
    create_unless_exists(&accounts, &account).await
}

async fn create_unless_exists<K>(api: &Api<K>, object: &K) -> Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {object:?}")),
    }
}

/// A ten-minute token for ServiceAccount `namespace/account` with `audience`.
pub async fn mint(
    client: &Client,
    namespace: &str,
    account: &str,
    audience: &str,
) -> Result<String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": { "audiences": [audience], "expirationSeconds": 600 },
    });
    let granted: TokenRequest = accounts
        .create_subresource("token", account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for {namespace}/{account}"))?;
    match granted.status.and_then(|status| status.token) {
        Some(token) if !token.is_empty() => Ok(token),
        _ => bail!("the TokenRequest for {namespace}/{account} granted no token"),
    }
}

/// POSTs `body` to `url` (`http://HOST:PORT/PATH`) with `token` as the bearer, and returns the
/// status and the answer's body; 0 when no status line came within 20 s.
pub async fn post(url: &str, token: &str, body: &str) -> Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url} is not an http:// URL"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(host)
            .await
            .with_context(|| format!("connecting to {host}"))?;
        let request = format!(
            "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
             Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, anyhow::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .unwrap_or_else(|_| Ok(String::new()))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let answer = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, answer))
}
