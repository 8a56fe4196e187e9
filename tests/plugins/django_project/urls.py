"""URLs of the test project."""

from __future__ import annotations

from django.urls import path

from tests.plugins.django_project import views

urlpatterns = [
    path("whoami", views.whoami),
    path("awhoami", views.awhoami),
    path("orders/<int:order_id>", views.order),
    path("orders", views.create_order),
    path("inventory", views.InventoryView.as_view()),
    path("items/<str:item>", views.AsyncItemView.as_view()),
    path("call", views.call),
    path("acall", views.acall),
]
