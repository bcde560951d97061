"""The test project's URLs: the Django admin, where the run journal shows."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
