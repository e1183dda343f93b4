import { describe, expect, it } from "vitest";
import { checkS3Allow, codeUriPrivateAllow } from "../../src/images/intake.ts";

describe("code URI settings", () => {
  it("reads COCOON_CODE_URI_PRIVATE_ALLOW (IPv4 and IPv6)", () => {
    expect(codeUriPrivateAllow({ COCOON_CODE_URI_PRIVATE_ALLOW: "127.0.0.1/32,fd00::/8" }).map((c) => c.text)).toEqual(["127.0.0.1/32", "fd00::/8"]);
    expect(() => codeUriPrivateAllow({ COCOON_CODE_URI_PRIVATE_ALLOW: "x" })).toThrow("COCOON_CODE_URI_PRIVATE_ALLOW");
  });

  it("accepts s3Allow entries of bucket/ or bucket/prefix and names a bad one", () => {
    expect(checkS3Allow(["code/", "code/apps/", "my.bucket-1/team-a/x"])).toEqual(["code/", "code/apps/", "my.bucket-1/team-a/x"]);
    for (const bad of ["code", "Code/", "ab/", "/apps", "code/../other/", "code/a/./b", "code/a\u0000"]) {
      expect(() => checkS3Allow(["code/", bad]), bad).toThrow(expect.objectContaining({ field: "s3Allow[1]" }) as Error);
    }
  });
});
