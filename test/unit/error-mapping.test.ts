import { describe, expect, it } from "vitest";
import { toApiError } from "../../src/api/error-mapping.ts";
import { toAwsError } from "../../src/api/aws/errors.ts";
import { AgentError, ApiError, ERROR_CODES, InvalidArgumentError, InvalidVmStateError, SnapshotIncompatibleError, VmNotFoundError } from "../../src/errors.ts";

describe("the one mapping of errors thrown below the API", () => {
  const cases: [string, Error, string, number][] = [
    ["a bad argument", new InvalidArgumentError("memoryMiB", "memoryMiB must be …"), "ValidationError", 400],
    ["the guest's missing file", new AgentError(404, "NotFound", "no such file"), "NotFound", 404],
    ["the guest's full disk", new AgentError(409, "Conflict", "no space left"), "Conflict", 409],
    ["a command the guest lacks", new AgentError(400, "CommandNotFound", "python9 not found"), "CommandNotFound", 400],
    ["the guest's own failure", new AgentError(500, "Internal", "boom"), "BadGateway", 502],
    ["an engine state race", new InvalidVmStateError("vm-1", "suspended", "exec in"), "InvalidState", 409],
    ["a VM the engine lost", new VmNotFoundError("vm-1"), "NotFound", 404],
    ["a snapshot of another QEMU build", new SnapshotIncompatibleError("made by QEMU 7.2 but this host runs 10.0"), "Conflict", 409],
    ["a VM suspended under another QEMU build", new SnapshotIncompatibleError("suspended by QEMU 7.2", "terminate it"), "Conflict", 409],
  ];
  it.each(cases)("%s", (_, err, code, status) => {
    const mapped = toApiError(err)!;
    expect(mapped.code).toBe(code);
    expect(ERROR_CODES[mapped.code].status).toBe(status);
    // The guest's 5xx text is not trusted as the whole answer; every other message passes on.
    if (code !== "BadGateway") expect(mapped.message).toBe(err.message);
    // What to do with an incompatible snapshot travels with it: a rebuild for an image, the end for a suspended VM.
    if (err instanceof SnapshotIncompatibleError) expect(mapped.details).toEqual({ action: err.action });
  });

  it("leaves unexpected errors unmapped (a 500 whose details stay in the log)", () => {
    expect(toApiError(new TypeError("x is undefined"))).toBeUndefined();
    expect(toApiError(new ApiError("Conflict", "taken"))?.code).toBe("Conflict");
  });

  it("means the same through the AWS door: an incompatible snapshot is a ConflictException there", () => {
    const aws = toAwsError(new SnapshotIncompatibleError("rebuild the image"));
    expect([aws.status, aws.type]).toEqual([409, "ConflictException"]);
    expect(toAwsError(new VmNotFoundError("vm-1")).type).toBe("ResourceNotFoundException");
    expect(toAwsError(new AgentError(404, "NotFound", "no such file")).type).toBe("ResourceNotFoundException");
  });
});
