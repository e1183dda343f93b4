import { LambdaMicrovmsClient, type LambdaMicrovmsClientConfig } from "@aws-sdk/client-lambda-microvms";
import type { ApiContext } from "../support/api-fixture.ts";

export interface AwsKey {
  tenant: string;
  tenantId: string;
  keyId: string;
  /** The key's secret: the Bearer key on /v1, the secretAccessKey of SigV4. */
  apiKey: string;
}

/** Creates a tenant (if new) and a key for it through /v1, as an operator would. */
export async function awsKey(api: ApiContext, tenant: string, permissions: string[]): Promise<AwsKey> {
  await api.call("POST", "/v1/tenants", { key: api.adminKey, body: { name: tenant } });
  const res = await api.call("POST", "/v1/keys", { key: api.adminKey, body: { tenant, permissions } });
  if (res.status !== 201) throw new Error(`creating a key: ${res.status} ${res.text}`);
  return { tenant, tenantId: res.body.tenantId, keyId: res.body.keyId, apiKey: res.body.apiKey };
}

/** The official client, unchanged but for its endpoint (and a region: any works). */
export function awsClient(api: ApiContext, key: Pick<AwsKey, "keyId" | "apiKey">, config: Partial<LambdaMicrovmsClientConfig> = {}): LambdaMicrovmsClient {
  return new LambdaMicrovmsClient({
    endpoint: api.url,
    region: "eu-west-3",
    credentials: { accessKeyId: key.keyId, secretAccessKey: key.apiKey },
    ...config,
  });
}

/** Runs `fn` and returns what it threw (failing if it did not). */
export type ThrownError = Error & { $metadata: { httpStatusCode?: number }; [field: string]: unknown };

export async function thrown(fn: () => Promise<unknown>): Promise<ThrownError> {
  try {
    await fn();
  } catch (err) {
    return err as ThrownError;
  }
  throw new Error("expected an error");
}
