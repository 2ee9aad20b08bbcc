#!/usr/bin/perl
# Verify the DKIM signatures of a message with Mail::DKIM (Perl: a verifier
# that neither relayd nor dkimpy wrote), reading the public keys from a
# zone file -- the lines `relayd dkim keygen` printed -- through a resolver
# object handed to Mail::DKIM::DNS::resolver(), its documented hook.
#
# Usage: perl tests/dkimverify.pl ZONEFILE < message
# Prints one line per signature, "RESULT DOMAIN SELECTOR ALGORITHM (DETAIL)",
# then "overall RESULT".
use strict;
use warnings;

package ZoneResolver;
use Net::DNS;
use Net::DNS::ZoneFile;

sub new {
    my ( $class, $file ) = @_;
    my $zone = Net::DNS::ZoneFile->new($file);
    my @rrs;
    while ( my $rr = $zone->read ) { push @rrs, $rr }
    return bless { rrs => \@rrs }, $class;
}

sub send {
    my ( $self, $name, $type ) = @_;
    my $packet = Net::DNS::Packet->new( $name, $type );
    $packet->header->qr(1);
    my @answer = grep { lc( $_->owner ) eq lc($name) && $_->type eq $type } @{ $self->{rrs} };
    $packet->push( answer => @answer );
    $packet->header->rcode( @answer ? 'NOERROR' : 'NXDOMAIN' );
    return $packet;
}

sub errorstring { return 'NOERROR' }

package main;
use Mail::DKIM::DNS;
use Mail::DKIM::Verifier;

Mail::DKIM::DNS::resolver( ZoneResolver->new( $ARGV[0] ) );
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (<STDIN>) {
    s/\r?\n\z/\015\012/;
    $dkim->PRINT($_);
}
$dkim->CLOSE;
for my $sig ( $dkim->signatures ) {
    printf "%s %s %s %s (%s)\n", $sig->result, $sig->domain, $sig->selector,
      $sig->algorithm, $sig->result_detail;
}
printf "overall %s\n", $dkim->result;
