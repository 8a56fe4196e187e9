"""URLs of ``payments``."""

from __future__ import annotations

from django.urls import path

from sample_services.shop.payments import views

urlpatterns = [
    path("api/charge", views.charge),
    path("api/charges/<str:key>", views.get_charge),
]
