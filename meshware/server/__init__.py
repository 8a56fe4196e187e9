"""meshware.server"""
