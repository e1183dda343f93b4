#!/usr/bin/perl
# A tiny app for the lifecycle hook tests, in Perl because the base image has
# perl-base (no python3, and builds here have no registry to install one).
# Port 8080: the app (GET / answers, GET /hooks returns what the hooks received).
# Port 8081: the hook listener; each call is appended to /tmp/hooks.log as "<path> <body>".
use strict;
use warnings;
use IO::Socket::INET;
use IO::Select;

my $log = "/tmp/hooks.log";
my (%port_of, $ready_calls);
my $select = IO::Select->new;
for my $port (8080, 8081) {
    my $s = IO::Socket::INET->new(LocalAddr => "0.0.0.0", LocalPort => $port, Listen => 16, ReuseAddr => 1) or die "listen $port: $!";
    $port_of{fileno $s} = $port;
    $select->add($s);
}
$ready_calls = 0;

sub reply {
    my ($c, $status, $body) = @_;
    print $c "HTTP/1.0 $status\r\nContent-Type: text/plain\r\nContent-Length: " . length($body) . "\r\nConnection: close\r\n\r\n$body";
}

sub handle {
    my ($c, $port) = @_;
    my $line = <$c> // return;
    my (undef, $path) = split / /, $line;
    my $len = 0;
    while (my $h = <$c>) {
        last if $h =~ /^\r?\n$/;
        $len = $1 if $h =~ /^content-length:\s*(\d+)/i;
    }
    my $body = "";
    read($c, $body, $len) if $len;
    if ($port == 8080) {
        if ($path eq "/hooks") {
            my $text = "";
            if (open my $f, "<", $log) { local $/; $text = <$f> // ""; }
            return reply($c, "200 OK", $text);
        }
        return reply($c, "200 OK", "app on 8080\n");
    }
    if (open my $f, ">>", $log) { print $f "$path $body\n"; close $f; }
    # Not ready for the first two calls: the build keeps asking until 2xx.
    return reply($c, ++$ready_calls < 3 ? "503 Starting" : "200 OK", "ready?\n") if $path eq "/ready";
    if ($path eq "/validate") {
        my $status = $ENV{VALIDATE_STATUS} // 200;
        return reply($c, "$status Validated", $status == 200 ? "valid\n" : "the schema is missing\n");
    }
    if ($path eq "/run") { sleep 2; return reply($c, "200 OK", "ran\n"); }
    return reply($c, "500 Refused", "suspend refused\n") if $path eq "/suspend";
    if ($path eq "/resume") { sleep 3; return reply($c, "200 OK", "resumed\n"); }
    return reply($c, "200 OK", "ok\n");
}

$| = 1;
print "hook app listening on 8080 and 8081\n";
while (1) {
    for my $l ($select->can_read) {
        my $c = $l->accept or next;
        handle($c, $port_of{fileno $l});
        close $c;
    }
}
