"""relayd: an SMTP relay appliance.

Mail comes in over ESMTP, is made durable in a spool, and goes out to a
smarthost or a local maildir.  Keep this module empty of imports: the twistd
plugin and the console script both import it early.
"""

__version__ = "0.1.0"
