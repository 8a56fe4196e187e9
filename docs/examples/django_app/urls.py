"""URLs of ``inventory``."""

from __future__ import annotations

from django.urls import path

from django_app import views

urlpatterns = [
    path("api/whoami", views.whoami),
    path("api/orders/<int:order_id>", views.stock),
    path("api/orders", views.OrdersView.as_view()),
    path("api/echo", views.echo),
    path("api/call/<str:service>", views.call),
]
