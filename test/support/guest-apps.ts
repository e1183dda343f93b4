import { expect } from "vitest";
import type { ApiContext } from "./api-fixture.ts";

/**
 * A static HTTP server for the base image (perl-base, no python): serves
 * `<root>/<path>` (`/` is `/index.html`) with a Content-Type from its
 * extension and the extra header lines of `<file>.headers`; a `<file>.raw`
 * is sent as it is, status line and all (for apps that answer garbage). A
 * WebSocket upgrade to `/ws…` is accepted and echoes text messages as
 * "echo:<text>" (elsewhere an upgrade gets the file, or 404). Request bodies
 * are not read: tests send none.
 */
export const STATIC_SERVER = String.raw`
use IO::Socket::INET; use Digest::SHA qw(sha1); use MIME::Base64;
my ($root, $port) = @ARGV;
$SIG{PIPE} = "IGNORE"; # a client that hangs up mid-answer (the proxy refusing a 64 KiB header) must not end the server
my $s = IO::Socket::INET->new(LocalPort => $port, Listen => 64, ReuseAddr => 1) or die "listen: $!";
sub slurp { my $f = shift; open(my $fh, "<", $f) or return ""; local $/; my $b = <$fh>; return $b }
sub echo_ws {
  my ($c, $key) = @_;
  my $accept = encode_base64(sha1($key . "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"), "");
  print $c "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: $accept\r\n\r\n";
  while (read($c, my $h, 2) == 2) {
    my ($b0, $b1) = unpack("CC", $h); my $len = $b1 & 127;
    read($c, my $mask, 4); my $p = ""; read($c, $p, $len) if $len;
    $p ^= substr($mask x (1 + $len / 4), 0, $len);
    last if ($b0 & 15) == 8;
    my $o = "echo:$p"; print $c pack("CC", 0x81, length $o) . $o;
  }
}
while (my $c = $s->accept) {
  $c->autoflush(1);
  my $first = <$c>; next unless defined $first; # a readiness probe: no request
  my $key; while (my $l = <$c>) { $key = $1 if $l =~ /^Sec-WebSocket-Key:\s*(\S+)/i; last if $l eq "\r\n" }
  my (undef, $path) = split / /, $first;
  if ($key && $path =~ m{^/ws}) { echo_ws($c, $key); close $c; next }
  $path =~ s/\?.*//; $path =~ s/\.\.//g; $path = "/index.html" if $path eq "/";
  my $f = "$root$path";
  if (-f "$f.raw") { print $c slurp("$f.raw") }
  elsif (-f $f) {
    my $b = slurp($f);
    my $ct = $f =~ /\.js$/ ? "text/javascript" : $f =~ /\.html$/ ? "text/html" : "text/plain";
    print $c "HTTP/1.1 200 OK\r\nContent-Type: $ct\r\n" . slurp("$f.headers") . "Content-Length: " . length($b) . "\r\nConnection: close\r\n\r\n$b";
  } else { print $c "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" }
  close $c;
}
`;

/**
 * A WebSocket server on `port` in the background (perl-base has Digest::SHA
 * and MIME::Base64 for the handshake): `onMessage` is perl run for each text
 * message, with the message in `$p` and the client in `$c` (`last` ends the
 * connection); a close frame ends it too.
 */
export function webSocketApp(port: number, onMessage: string): string {
  return `nohup perl -MIO::Socket::INET -MDigest::SHA=sha1 -MMIME::Base64 -e '
  my $s = IO::Socket::INET->new(LocalPort => ${port}, Listen => 16, ReuseAddr => 1) or die;
  while (my $c = $s->accept) {
    $c->autoflush(1);
    my $key; while (my $l = <$c>) { $key = $1 if $l =~ /^Sec-WebSocket-Key:\\s*(\\S+)/i; last if $l eq "\\r\\n" }
    next unless $key;
    my $accept = encode_base64(sha1($key . "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"), "");
    print $c "HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\nSec-WebSocket-Accept: $accept\\r\\n\\r\\n";
    while (read($c, my $h, 2) == 2) {
      my ($b0, $b1) = unpack("CC", $h); my $len = $b1 & 127;
      read($c, my $mask, 4); my $p = ""; read($c, $p, $len) if $len;
      $p ^= substr($mask x (1 + $len / 4), 0, $len);
      last if ($b0 & 15) == 8;
      ${onMessage}
    }
    close $c;
  }' > /dev/null 2>&1 &`;
}

/** Uploads `files` under /srv/www-<port> and serves them on `port` in VM `id`; resolves once the port accepts. */
export async function serveStatic(api: ApiContext, key: string, id: string, port: number, files: Record<string, string | Buffer>): Promise<void> {
  const root = `/srv/www-${port}`;
  const put = async (path: string, body: string | Buffer) => {
    const res = await api.call("PUT", `/v1/microvms/${id}/files?path=${encodeURIComponent(path)}`, { key, raw: body });
    expect(res.status, res.text).toBe(200);
  };
  await put("/srv/static-server.pl", STATIC_SERVER);
  for (const [name, body] of Object.entries(files)) await put(`${root}/${name}`, body);
  await startApp(api, key, id, `nohup perl /srv/static-server.pl ${root} ${port} > /dev/null 2>&1 &`, port);
}

/** Runs `command` (which starts a server in the background) and waits until `port` accepts (perl takes seconds to start under TCG). */
export async function startApp(api: ApiContext, key: string, id: string, command: string, port: number): Promise<void> {
  const started = await api.call("POST", `/v1/microvms/${id}/exec`, { key, body: { command } });
  expect(started.status, started.text).toBe(200);
  const ready = await api.call("POST", `/v1/microvms/${id}/exec`, {
    key,
    // bash, not sh (dash): /dev/tcp is a bash feature.
    body: { command: ["bash", "-c", `for i in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/${port}) 2>/dev/null && exit 0; sleep 0.2; done; exit 1`], timeoutSeconds: 120 },
  });
  expect(ready.body.exitCode, `port ${port} never opened`).toBe(0);
}
