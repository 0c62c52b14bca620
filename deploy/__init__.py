"""Deployment Engine: certificates, a SuperLink and SuperNodes with TLS and authentication.

See federation.py.
"""
