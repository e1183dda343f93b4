import { useState, type FormEvent } from "react";
import { api, ApiError } from "../api.ts";

/** Sign-in with an API key; the key is checked against the API, then kept in sessionStorage only. */
export function SignIn({ onSignIn }: { onSignIn: (key: string) => void }) {
  const [key, setKey] = useState("");
  const [error, setError] = useState("");
  const [busy, setBusy] = useState(false);
  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setBusy(true);
    setError("");
    try {
      await api.check(key.trim());
      onSignIn(key.trim());
    } catch (err) {
      setError(err instanceof ApiError && err.status === 401 ? "That API key is not valid." : (err as Error).message);
    } finally {
      setBusy(false);
    }
  };
  return (
    <main className="signin">
      <h1>Cocoon console</h1>
      <form onSubmit={submit} className="card">
        <label htmlFor="apiKey">API key</label>
        <input id="apiKey" name="apiKey" type="password" autoComplete="off" autoFocus required value={key} onChange={(e) => setKey(e.target.value)} aria-describedby="apiKeyHelp apiKeyError" />
        <p id="apiKeyHelp" className="hint">
          Kept in this browser tab's session only. The server's admin key is in <code>&lt;dataDir&gt;/admin.key</code>.
        </p>
        {error && (
          <p id="apiKeyError" className="error" role="alert">
            {error}
          </p>
        )}
        <button type="submit" disabled={busy || !key.trim()}>
          {busy ? "Signing in…" : "Sign in"}
        </button>
      </form>
    </main>
  );
}
